package controlplane

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/targets"
	"github.com/detourhq/detour/internal/testbed"
)

// Two regions throughout: us-gcs (region us) and eu-gcs (region eu), each its own bucket in the
// test's emulator, and agents of both regions whose clients accept both targets.
var bothRegions = []string{"us-gcs", "eu-gcs"}

// placeIn asks where k comes from for an agent in region whose client accepts accepted.
func placeIn(t *testing.T, r *replica, region, k string, accepted ...string) *pb.PlaceResponse {
	t.Helper()
	resp, err := r.place.Place(context.Background(), &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: accepted,
		AgentRegion: region, AgentId: "agent-" + region})
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func metric(t *testing.T, r *replica, name string, labels ...string) float64 {
	t.Helper()
	return testbed.Metric(t, "http://"+r.metricsAddr()+"/metrics", name, labels...)
}

// waitRounds waits until loop has completed n more rounds on r than it had when called, so the
// last of them started after the call.
func waitRounds(t *testing.T, r *replica, loop string, n int) {
	t.Helper()
	from := metric(t, r, "detour_loop_rounds_total", `loop="`+loop+`"`)
	eventually(t, 10*time.Second, fmt.Sprintf("%d %s rounds", n, loop), func() bool {
		return metric(t, r, "detour_loop_rounds_total", `loop="`+loop+`"`) >= from+float64(n)
	})
}

// waitCopierLooked waits until the redirects counted so far have been turned into copy requests
// and the janitor's copier has worked through them: two flushes of copy requests, then two copier
// rounds (the second of each started after the one before was done). A copy that was going to be
// made is made by then, so a test that finds none has shown that none was asked for.
func waitCopierLooked(t *testing.T, r *replica) {
	t.Helper()
	waitRounds(t, r, loopCopyRequests, 2)
	waitRounds(t, r, loopCopy, 2)
}

// setPolicy edits the stored policy and returns once this replica's placement uses it.
func setPolicy(t *testing.T, r *replica, edit func(*pb.Policy)) {
	t.Helper()
	ctx := context.Background()
	cur, err := r.admin.GetPolicy(ctx, &pb.GetPolicyRequest{})
	if err != nil {
		t.Fatal(err)
	}
	edit(cur.Policy)
	if _, err := r.admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: cur.Policy}); err != nil {
		t.Fatal(err)
	}
	// Reads wait for the replica's own writes; Place reads the same snapshot.
	if _, err := r.admin.GetPolicy(ctx, &pb.GetPolicyRequest{}); err != nil {
		t.Fatal(err)
	}
}

func setState(t *testing.T, r *replica, name string, state pb.TargetState) {
	t.Helper()
	ctx := context.Background()
	if _, err := r.admin.SetTargetState(ctx, &pb.SetTargetStateRequest{Name: name, State: state}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.admin.GetTarget(ctx, &pb.GetTargetRequest{Name: name}); err != nil { // waits for the write
		t.Fatal(err)
	}
}

func copiesAt(t *testing.T, r *replica, target, k string) []*pb.StoredObject {
	t.Helper()
	list, err := r.admin.ListObjects(context.Background(), &pb.ListObjectsRequest{Target: target, KeyPrefix: k})
	if err != nil {
		t.Fatal(err)
	}
	return list.Objects
}

// checkCopy checks that the record of k at target names exactly the bytes of want, in the
// target's bucket, at the generation the store holds them under.
func checkCopy(t *testing.T, r *replica, target, k string, want []byte) *pb.StoredObject {
	t.Helper()
	objs := copiesAt(t, r, target, k)
	if len(objs) != 1 {
		t.Fatalf("%d copies of %s at %s, want 1", len(objs), k[len(k)-6:], target)
	}
	o := objs[0]
	env := sharedEnv(t)
	got, there := storedBytes(t, o.Bucket, o.ObjectName)
	a, err := env.store.Stat(context.Background(), o.Bucket, o.ObjectName)
	switch {
	case o.Bucket != "bucket-"+target || o.ObjectName != "hg/"+k:
		t.Fatalf("copy recorded at %s/%s", o.Bucket, o.ObjectName)
	case !there || string(got) != string(want):
		t.Fatalf("the copy at %s does not hold the original bytes (%d bytes, want %d)", target, len(got), len(want))
	case err != nil || a.Generation != o.Generation || a.CRC32C != o.Crc32C || a.Size != o.Size:
		t.Fatalf("record %v does not match the stored object %+v (%v)", o, a, err)
	}
	return o
}

// A region whose target cannot be filled (disabled here) still offloads, through another region;
// the policy switch keeps fills at home.
func TestFillFailsOverAcrossRegionsUnlessForbidden(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	createTargets(t, r, target(t, "us-gcs", "us"), target(t, "eu-gcs", "eu"))
	setState(t, r, "eu-gcs", pb.TargetState_TARGET_STATE_DISABLED)
	setPolicy(t, r, func(p *pb.Policy) { p.MinOccurrences = 1 }) // this test is about the first miss

	k := key(1)
	miss := placeIn(t, r, "eu", k, bothRegions...)
	if miss.Fill.GetTarget() != "us-gcs" || miss.Reason != "fill_remote" || miss.Fill.Bucket != "bucket-us-gcs" {
		t.Fatalf("a region without a fillable target: %v", miss)
	}
	data := []byte(strings.Repeat("filled across regions\n", 100))
	if _, err := r.place.ReportFill(context.Background(), report(k, miss.Fill, upload(t, miss.Fill, k, data))); err != nil {
		t.Fatal(err)
	}
	if got := metric(t, r, "detour_cross_region_fills_total", `target_region="us"`); got != 1 {
		t.Fatalf("cross-region fills counted: %v, want 1", got)
	}
	hit := placeIn(t, r, "eu", k, bothRegions...)
	if hit.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT || hit.Target != "us-gcs" || httpGet(t, hit.Location.Url) != string(data) {
		t.Fatalf("the failed-over fill is not served: %v", hit)
	}

	setPolicy(t, r, func(p *pb.Policy) { p.ForbidCrossRegionFills = true })
	forbidden := placeIn(t, r, "eu", key(2), bothRegions...)
	if forbidden.Fill != nil || forbidden.Reason != "cross_region_fill_forbidden" {
		t.Fatalf("a forbidden cross-region fill: %v", forbidden)
	}
	// Forbidding fills does not stop redirects to what exists, nor fills at home.
	if got := placeIn(t, r, "eu", k, bothRegions...); got.Target != "us-gcs" {
		t.Fatalf("redirect after forbidding cross-region fills: %v", got)
	}
	if got := placeIn(t, r, "us", key(3), bothRegions...); got.Fill.GetTarget() != "us-gcs" || got.Reason != "fill" {
		t.Fatalf("an in-region fill under the switch: %v", got)
	}
	if got := metric(t, r, "detour_cross_region_fills_total"); got != 1 {
		t.Fatalf("cross-region fills counted: %v, want still 1", got)
	}
}

// A draining target keeps serving the copies nothing else has, gets no fills, and shows how many
// it holds; the janitor copies them (store-side, verified) to an active target as soon as one may
// take them, after which the draining copy is no longer used; a disabled target gets nothing.
func TestDrainServesSoleCopiesUntilTheJanitorHasCopiedThemAway(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	ctx := context.Background()
	createTargets(t, r, target(t, "eu-gcs", "eu"))
	_, data := fill(t, r, key(1), []string{"eu-gcs"}, "eu")
	waitRedirect(t, r, key(1), "eu-gcs")
	setState(t, r, "eu-gcs", pb.TargetState_TARGET_STATE_DRAINING)

	// Nowhere to move the copy yet: it is served from the draining target, to both regions.
	for _, region := range []string{"eu", "us"} {
		if got := placeIn(t, r, region, key(1), "eu-gcs"); got.Target != "eu-gcs" || httpGet(t, got.Location.Url) != string(data) {
			t.Fatalf("agent in %s: the draining target's sole copy is not served: %v", region, got)
		}
	}
	if got := placeIn(t, r, "eu", key(2), "eu-gcs"); got.Fill != nil || got.Reason != "no_fill_target" {
		t.Fatalf("a draining target is granted a fill: %v", got)
	}
	drainOf := func() *pb.DrainProgress {
		got, err := r.admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "eu-gcs"})
		if err != nil {
			t.Fatal(err)
		}
		return got.Target.Drain
	}
	waitCopierLooked(t, r) // the copier has looked and found nowhere to copy to
	if d := drainOf(); d.GetSoleCopies() != 1 || d.GetCopies() != 1 {
		t.Fatalf("drain progress %v, want 1 sole copy of 1", d)
	}

	// An active target appears in another region: the janitor copies the sole copy there.
	createTargets(t, r, target(t, "us-gcs", "us"))
	eventually(t, 5*time.Second, "the drain completes", func() bool { return drainOf().GetSoleCopies() == 0 })
	moved := checkCopy(t, r, "us-gcs", key(1), data)
	if d := drainOf(); d.GetCopies() != 1 {
		t.Fatalf("drain progress %v: the draining target's own copy should still be counted", d)
	}
	if moved.Expires == nil || moved.TargetUid == "" {
		t.Fatalf("the copy's record lacks expiry or target uid: %v", moved)
	}
	got := placeIn(t, r, "eu", key(1), bothRegions...)
	if got.Target != "us-gcs" || got.Location.Size != uint64(len(data)) || httpGet(t, got.Location.Url) != string(data) {
		t.Fatalf("once another copy exists the draining one must not be used: %v", got)
	}
	if n := metric(t, r, "detour_store_copies_total", `reason="drain"`, `outcome="ready"`); n != 1 {
		t.Fatalf("drain copies counted: %v", n)
	}
	eventually(t, 5*time.Second, "the sole-copies gauge at 0", func() bool {
		return strings.Contains(httpGet(t, "http://"+r.metricsAddr()+"/metrics"), `detour_drain_sole_copies{target="eu-gcs"} 0`)
	})

	setState(t, r, "eu-gcs", pb.TargetState_TARGET_STATE_DISABLED)
	if got := placeIn(t, r, "eu", key(1), "eu-gcs"); got.Result != pb.PlaceResult_PLACE_RESULT_INLINE || got.Reason != "no_candidates" {
		t.Fatalf("a disabled target still serves: %v", got)
	}
}

// Residency holds for drains too: with cross-region fills forbidden, a draining target's sole
// copies move only within its region.
func TestForbiddenCrossRegionFillsKeepDrainMigrationInRegion(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	ctx := context.Background()
	createTargets(t, r, target(t, "eu-gcs", "eu"), target(t, "us-gcs", "us"))
	_, data := fill(t, r, key(1), []string{"eu-gcs"}, "eu")
	waitRedirect(t, r, key(1), "eu-gcs")
	setPolicy(t, r, func(p *pb.Policy) { p.ForbidCrossRegionFills = true })
	setState(t, r, "eu-gcs", pb.TargetState_TARGET_STATE_DRAINING)
	waitCopierLooked(t, r)
	if objs := copiesAt(t, r, "us-gcs", key(1)); len(objs) != 0 {
		t.Fatalf("a drain moved bytes across regions under forbid_cross_region_fills: %v", objs)
	}
	createTargets(t, r, target(t, "eu-gcs-2", "eu"))
	eventually(t, 5*time.Second, "the copy in the draining target's own region", func() bool {
		return len(copiesAt(t, r, "eu-gcs-2", key(1))) == 1
	})
	checkCopy(t, r, "eu-gcs-2", key(1), data)
	got, err := r.admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "eu-gcs"})
	if err != nil || got.Target.Drain.GetSoleCopies() != 0 {
		t.Fatalf("drain progress after the in-region copy: %v %v", got, err)
	}
}

// A key redirected across regions more than the policy's threshold within its window gets a
// server-side copy in the requesting region, verified and bound to that target's bucket; from
// then on that region's agents are redirected in-region. A key below the threshold, or any key
// with copies turned off, gets none.
func TestHotCrossRegionKeyGetsAnInRegionCopy(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	createTargets(t, r, target(t, "us-gcs", "us"), target(t, "eu-gcs", "eu"))
	setPolicy(t, r, func(p *pb.Policy) {
		p.CrossRegionCopyThreshold, p.CrossRegionCopyWindow = 3, durationpb.New(time.Minute)
	})
	hot, cold := key(1), key(2)
	_, hotData := fill(t, r, hot, []string{"us-gcs"}, "us")
	fill(t, r, cold, []string{"us-gcs"}, "us")
	waitRedirect(t, r, hot, "us-gcs")
	waitRedirect(t, r, cold, "us-gcs")

	for i := 0; i < 3; i++ {
		for _, k := range []string{hot, cold} {
			if got := placeIn(t, r, "eu", k, bothRegions...); got.Target != "us-gcs" {
				t.Fatalf("cross-region redirect %d: %v", i, got)
			}
		}
	}
	waitCopierLooked(t, r)
	if objs := copiesAt(t, r, "eu-gcs", ""); len(objs) != 0 {
		t.Fatalf("copied at the threshold, not past it: %v", objs)
	}
	placeIn(t, r, "eu", hot, bothRegions...) // the fourth: past the threshold
	var local *pb.PlaceResponse
	eventually(t, 5*time.Second, "an in-region redirect for the hot key", func() bool {
		local = placeIn(t, r, "eu", hot, bothRegions...)
		return local.Target == "eu-gcs"
	})
	checkCopy(t, r, "eu-gcs", hot, hotData)
	if httpGet(t, local.Location.Url) != string(hotData) || local.Location.Size != uint64(len(hotData)) {
		t.Fatalf("the in-region location does not serve the object")
	}
	// The us agents keep their own copy; the cold key stays where it is.
	if got := placeIn(t, r, "us", hot, bothRegions...); got.Target != "us-gcs" {
		t.Fatalf("us agents redirected to %s", got.Target)
	}
	if objs := copiesAt(t, r, "eu-gcs", cold); len(objs) != 0 {
		t.Fatalf("a key below the threshold was copied: %v", objs)
	}
	for _, want := range []struct {
		name   string
		labels []string
		value  float64
	}{
		{"detour_store_copies_total", []string{`reason="cross_region"`, `outcome="ready"`}, 1},
		{"detour_copy_requests_total", []string{`outcome="queued"`}, 1},
		{"detour_store_copy_duration_seconds_count", []string{`reason="cross_region"`}, 1},
	} {
		if got := metric(t, r, want.name, want.labels...); got != want.value {
			t.Errorf("%s%v = %v, want %v", want.name, want.labels, got, want.value)
		}
	}
	if in, cross := metric(t, r, "detour_redirects_total", `locality="in_region"`), metric(t, r, "detour_redirects_total", `locality="cross_region"`); in < 2 || cross < 7 {
		t.Errorf("redirects by locality: %v in region, %v cross-region", in, cross)
	}

	// Copies turned off: however hot, no copy.
	setPolicy(t, r, func(p *pb.Policy) { p.DisableCrossRegionCopies = true })
	for range 10 {
		placeIn(t, r, "eu", cold, bothRegions...)
	}
	waitCopierLooked(t, r)
	if objs := copiesAt(t, r, "eu-gcs", cold); len(objs) != 0 {
		t.Fatalf("copied with cross-region copies turned off: %v", objs)
	}
}

// The replica that counts a key's redirects need not be the janitor: the count's crossing is
// queued in etcd and the elected replica makes the copy.
func TestCopyRequestsReachTheJanitorFromAnyReplica(t *testing.T) {
	t.Parallel()
	a, b := startReplica(t), startReplica(t)
	createTargets(t, a, target(t, "us-gcs", "us"), target(t, "eu-gcs", "eu"))
	setPolicy(t, a, func(p *pb.Policy) { p.CrossRegionCopyThreshold = 2 })
	var other *replica
	eventually(t, 10*time.Second, "one replica elected janitor", func() bool {
		ja, jb := metric(t, a, "detour_janitor_elected"), metric(t, b, "detour_janitor_elected")
		switch {
		case ja == 1 && jb == 0:
			other = b
		case jb == 1 && ja == 0:
			other = a
		}
		return other != nil
	})
	k := key(1)
	_, data := fill(t, other, k, []string{"us-gcs"}, "us")
	eventually(t, 5*time.Second, "the other replica knows the policy and the object", func() bool {
		p, err := other.admin.GetPolicy(context.Background(), &pb.GetPolicyRequest{})
		return err == nil && p.Policy.CrossRegionCopyThreshold == 2 && placeIn(t, other, "us", k, "us-gcs").Target == "us-gcs"
	})
	for range 3 {
		placeIn(t, other, "eu", k, bothRegions...)
	}
	eventually(t, 5*time.Second, "the janitor's copy in eu", func() bool { return len(copiesAt(t, other, "eu-gcs", k)) == 1 })
	checkCopy(t, other, "eu-gcs", k, data)
	if got := metric(t, other, "detour_store_copies_total"); got != 0 {
		t.Fatalf("the replica that is not the janitor made %v copies", got)
	}
}

// A copy never records bytes that are not the source record's: a source replaced behind Detour's
// back is not copied; bytes already at the destination are adopted only if they are the
// record's, and deleted otherwise.
func TestCopiesRecordOnlyTheSourceRecordsBytes(t *testing.T) {
	t.Parallel()
	// Each case below asks for one copy, once: a request whose destination region has no healthy
	// target when the copier reads it is dropped (it would be asked for again in the key's next
	// window). So a slow probe on a loaded machine must not fail eu-gcs here.
	j := fastJanitor
	j.ProbeFailures = 1000
	r := startReplicaWith(t, Options{WriteTimeout: time.Second, Janitor: j})
	ctx := context.Background()
	env := sharedEnv(t)
	createTargets(t, r, target(t, "us-gcs", "us"), target(t, "eu-gcs", "eu"))
	setPolicy(t, r, func(p *pb.Policy) { p.CrossRegionCopyThreshold = 1 })
	// And the store guard's listing at start must be behind us: one that began after the source
	// was replaced below would retire the source's record, and the copy request with it.
	eventually(t, 5*time.Second, "both targets' records confirmed", func() bool {
		return r.srv.svc.guard.unverifiedTargets() == 0
	})
	makeHot := func(k string) {
		for range 2 {
			if got := placeIn(t, r, "eu", k, bothRegions...); got.Target != "us-gcs" {
				t.Fatalf("cross-region redirect of %s: %v", k[len(k)-6:], got)
			}
		}
	}

	// The source replaced: the recorded generation is gone, no copy is made.
	replaced, _ := fill(t, r, key(1), []string{"us-gcs"}, "us")
	waitRedirect(t, r, key(1), "us-gcs")
	// (Its hold released first, as whoever replaces it must.)
	if _, err := env.store.Hold(ctx, replaced.Bucket, replaced.ObjectName, copiesAt(t, r, "us-gcs", key(1))[0].Generation, false); err != nil {
		t.Fatal(err)
	}
	if err := env.store.Put(ctx, replaced.Bucket, replaced.ObjectName, MediaTypeCBOR, []byte("not the recorded bytes")); err != nil {
		t.Fatal(err)
	}
	makeHot(key(1))
	eventually(t, 5*time.Second, "the failed copy counted", func() bool {
		return metric(t, r, "detour_store_copies_total", `reason="cross_region"`, `outcome="failed"`) == 1
	})
	if _, there := storedBytes(t, "bucket-eu-gcs", "hg/"+key(1)); there || len(copiesAt(t, r, "eu-gcs", key(1))) != 0 {
		t.Fatal("a replaced source was copied")
	}

	// Other bytes already at the destination's name: rejected and deleted.
	fill(t, r, key(2), []string{"us-gcs"}, "us")
	waitRedirect(t, r, key(2), "us-gcs")
	if err := env.store.Put(ctx, "bucket-eu-gcs", "hg/"+key(2), MediaTypeCBOR, []byte("squatter")); err != nil {
		t.Fatal(err)
	}
	makeHot(key(2))
	eventually(t, 5*time.Second, "the squatting bytes deleted", func() bool {
		_, there := storedBytes(t, "bucket-eu-gcs", "hg/"+key(2))
		return !there
	})
	if objs := copiesAt(t, r, "eu-gcs", key(2)); len(objs) != 0 {
		t.Fatalf("bytes that are not the record's were recorded: %v", objs)
	}
	if n := metric(t, r, "detour_store_copies_total", `outcome="unverified"`); n != 1 {
		t.Fatalf("unverified copies counted: %v", n)
	}

	// The record's own bytes already there (a copy that stored them and died): adopted.
	_, data3 := fill(t, r, key(3), []string{"us-gcs"}, "us")
	waitRedirect(t, r, key(3), "us-gcs")
	src := copiesAt(t, r, "us-gcs", key(3))[0]
	early, err := env.store.Copy(ctx, src.Bucket, src.ObjectName, src.Generation, "bucket-eu-gcs", "hg/"+key(3))
	if err != nil {
		t.Fatal(err)
	}
	makeHot(key(3))
	eventually(t, 5*time.Second, "the earlier copy adopted", func() bool { return len(copiesAt(t, r, "eu-gcs", key(3))) == 1 })
	if o := checkCopy(t, r, "eu-gcs", key(3), data3); o.Generation != early.Generation {
		t.Fatalf("adopted generation %d, the bytes there are generation %d", o.Generation, early.Generation)
	}
}

// The redirect counters hold at most their limit of (key, region) pairs, count within a window,
// and cross the threshold once per window.
func TestHotKeysAreBoundedAndWindowed(t *testing.T) {
	t.Parallel()
	const limit = 64
	h := newHotKeys(limit)
	c := copySettings{threshold: 2, window: time.Minute}
	t0 := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	k := func(i int) targets.Key {
		kk, _ := targets.ParseKey(key(i))
		return kk
	}
	crossings := 0
	for i := range 5 {
		if n, crossed := h.count(k(1), "eu", t0.Add(time.Duration(i)*time.Second), c); crossed {
			crossings++
			if n != 3 {
				t.Fatalf("crossed at %d, want 3", n)
			}
		}
	}
	if crossings != 1 {
		t.Fatalf("%d crossings within one window, want 1", crossings)
	}
	if n, _ := h.count(k(1), "us", t0, c); n != 1 {
		t.Fatalf("another region shares the count: %d", n)
	}
	// The window ends: counting starts over, and the key can cross again.
	later := t0.Add(2 * time.Minute)
	for i := range 3 {
		if _, crossed := h.count(k(1), "eu", later, c); crossed != (i == 2) {
			t.Fatalf("redirect %d of a new window: crossed=%v", i+1, crossed)
		}
	}
	// Many keys: never more than the limit; expired pairs make room for new ones.
	for i := range 10 * limit {
		h.count(k(1000+i), "eu", later, c)
	}
	if n := h.size(); n > limit {
		t.Fatalf("%d pairs counted, limit %d", n, limit)
	}
	if n, _ := h.count(k(99999), "eu", later, c); n != 0 {
		t.Fatalf("a full counter counted a new pair: %d", n)
	}
	if n, _ := h.count(k(99999), "eu", later.Add(2*time.Minute), c); n != 1 {
		t.Fatalf("once the windows are over a new pair is counted: %d", n)
	}
	if n := h.size(); n > limit {
		t.Fatalf("%d pairs counted after pruning, limit %d", n, limit)
	}
}
