package controlplane

import (
	"context"
	"crypto/sha256"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/targets"
	"github.com/detourhq/detour/internal/testbed"
)

// placeKey asks where k comes from for a client accepting accepted.
func placeKey(t *testing.T, r *replica, k string, accepted ...string) *pb.PlaceResponse {
	t.Helper()
	resp, err := r.place.Place(context.Background(), &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: accepted, AgentRegion: "us", AgentId: "a2"})
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func waitRedirect(t *testing.T, r *replica, k string, accepted ...string) *pb.PlaceResponse {
	t.Helper()
	var resp *pb.PlaceResponse
	eventually(t, 5*time.Second, "a redirect for "+k[len(k)-6:], func() bool {
		resp = placeKey(t, r, k, accepted...)
		return resp.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT
	})
	return resp
}

func waitNoRedirect(t *testing.T, r *replica, within time.Duration, k string, accepted ...string) time.Duration {
	t.Helper()
	start := time.Now()
	eventually(t, within, "no more redirects for "+k[len(k)-6:], func() bool {
		return placeKey(t, r, k, accepted...).Result != pb.PlaceResult_PLACE_RESULT_REDIRECT
	})
	return time.Since(start)
}

func objectCount(t *testing.T, r *replica) int {
	t.Helper()
	list, err := r.admin.ListObjects(context.Background(), &pb.ListObjectsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return len(list.Objects)
}

func storedBytes(t *testing.T, bucket, name string) ([]byte, bool) {
	t.Helper()
	b, err := sharedEnv(t).gcs.Object(bucket, name)
	return b, err == nil
}

// Every way a report can lie is refused, nothing becomes READY, the claim is released at once, and
// the bytes at the granted name (if any) are deleted; another key's object is never touched.
func TestForgedFillReportsAreRejected(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	ctx := context.Background()
	createTargets(t, r, target(t, "us-a", "us"))
	acc := []string{"us-a"}
	// Another key's object, filled honestly: the forgeries point at it.
	victimKey := key(50)
	victim, victimData := fill(t, r, victimKey, acc, "us")
	victimRedirect := waitRedirect(t, r, victimKey, "us-a")
	other := sha256.Sum256([]byte("other"))

	cases := []struct {
		name   string
		upload bool
		forge  func(req *pb.ReportFillRequest)
		code   codes.Code
		says   string
	}{
		{"another key's object name", false, func(q *pb.ReportFillRequest) {
			q.ObjectName = victim.ObjectName
			q.Size, q.Sha256, q.Sha1 = victimRedirect.Location.Size, victimRedirect.Location.Sha256, victimRedirect.Location.Sha1
			q.Generation = 1
		}, codes.InvalidArgument, "object_name"},
		{"another target", true, func(q *pb.ReportFillRequest) { q.Target = "eu-x" }, codes.InvalidArgument, "target"},
		{"another media type", true, func(q *pb.ReportFillRequest) { q.MediaType = "text/html" }, codes.InvalidArgument, "media_type"},
		{"nothing uploaded", false, func(q *pb.ReportFillRequest) {
			q.Size, q.Sha256, q.Sha1, q.Generation = 100, other[:], other[:20], 1
		}, codes.FailedPrecondition, "not found"},
		{"wrong size", true, func(q *pb.ReportFillRequest) { q.Size++ }, codes.FailedPrecondition, "size"},
		{"wrong sha256", true, func(q *pb.ReportFillRequest) { q.Sha256 = other[:] }, codes.FailedPrecondition, "sha256"},
		{"wrong sha1", true, func(q *pb.ReportFillRequest) { q.Sha1 = other[:20] }, codes.FailedPrecondition, "sha1"},
		{"wrong crc32c", true, func(q *pb.ReportFillRequest) { q.Crc32C ^= 0xff }, codes.FailedPrecondition, "crc32c"},
		{"wrong generation", true, func(q *pb.ReportFillRequest) { q.Generation++ }, codes.FailedPrecondition, "generation"},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			k := key(60 + i)
			g := grant(t, r, k, acc, "us")
			req := &pb.ReportFillRequest{Key: k, Target: g.Target, Token: g.Token, MediaType: g.MediaType, ObjectName: g.ObjectName}
			if c.upload {
				req = report(k, g, upload(t, g, k, []byte(strings.Repeat("honest bytes of "+k, 50))))
			}
			c.forge(req)
			_, err := r.place.ReportFill(ctx, req)
			if code(err) != c.code || !strings.Contains(err.Error(), c.says) {
				t.Fatalf("forged report: %v, want %s naming %q", err, c.code, c.says)
			}
			// Nothing READY; the claim is released, so the key can be granted again at once. (Each
			// Place may itself take the claim, so the first grant ends the wait.)
			var last *pb.PlaceResponse
			eventually(t, 5*time.Second, "the claim released", func() bool {
				last = placeKey(t, r, k, acc...)
				if last.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
					t.Fatalf("a rejected fill is redirected to: %v", last)
				}
				if last.Fill != nil {
					_, _ = r.place.AbortFill(ctx, &pb.AbortFillRequest{Key: k, Token: last.Fill.Token})
				}
				return last.Fill != nil
			})
			if c.upload {
				eventually(t, 5*time.Second, "the rejected fill's bytes deleted", func() bool {
					_, there := storedBytes(t, g.Bucket, g.ObjectName)
					return !there
				})
			}
		})
	}
	if n := objectCount(t, r); n != 1 {
		t.Fatalf("%d objects READY after forged reports, want only the honest one", n)
	}
	if got, ok := storedBytes(t, victim.Bucket, victim.ObjectName); !ok || string(got) != string(victimData) {
		t.Fatal("a forged report damaged another key's object")
	}
	if resp := placeKey(t, r, victimKey, acc...); resp.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatalf("the honest object is no longer redirected to: %v", resp)
	}
}

// An object deleted from the bucket behind Detour's back stops being redirected to: at the next
// reconcile, or at once when an agent reports the broken location (which the control plane
// verifies: a report about an intact object removes nothing).
func TestObjectDeletedBehindDetoursBackIsRetired(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	ctx := context.Background()
	createTargets(t, r, target(t, "us-a", "us"))
	a, _ := fill(t, r, key(1), []string{"us-a"}, "us")
	b, _ := fill(t, r, key(2), []string{"us-a"}, "us")
	waitRedirect(t, r, key(1), "us-a")
	waitRedirect(t, r, key(2), "us-a")

	// A report about an intact object: checked, kept.
	resp, err := r.place.ReportBrokenLocation(ctx, &pb.ReportBrokenLocationRequest{Key: key(1), Target: "us-a", Reason: "HTTP 404"})
	if err != nil || resp.Removed {
		t.Fatalf("report about an intact object: %v %v", resp, err)
	}
	if placeKey(t, r, key(1), "us-a").Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatal("an unverified report removed an intact object")
	}

	env := sharedEnv(t)
	if err := env.store.Delete(ctx, a.Bucket, a.ObjectName, 0); err != nil {
		t.Fatal(err)
	}
	if err := env.store.Delete(ctx, b.Bucket, b.ObjectName, 0); err != nil {
		t.Fatal(err)
	}
	// key(1): an agent's sampled check reports it.
	resp, err = r.place.ReportBrokenLocation(ctx, &pb.ReportBrokenLocationRequest{Key: key(1), Target: "us-a", Reason: "HTTP 404"})
	if err != nil || !resp.Removed {
		t.Fatalf("report about a deleted object: %v %v", resp, err)
	}
	waitNoRedirect(t, r, 2*time.Second, key(1), "us-a")
	// key(2): the reconciler finds it.
	if placeKey(t, r, key(2), "us-a").Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatal("key 2 stopped redirecting before anything noticed")
	}
	if err := r.srv.Janitor().Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	waitNoRedirect(t, r, 2*time.Second, key(2), "us-a")
	if body := httpGet(t, "http://"+r.metricsAddr()+"/metrics"); !strings.Contains(body, `detour_reconcile_missing_objects_total{target="us-a"} 1`) ||
		!strings.Contains(body, `detour_broken_location_reports_total{outcome="removed"} 1`) {
		t.Fatalf("metrics do not count the missing objects:\n%s", body)
	}
}

// A target whose client-facing URL stops serving (the store unreachable, a 403 from a bucket that
// is not public, a CDN's 404) stops being redirected to within the detection time, with the
// default probe settings; it comes back when it serves again.
func TestFailingTargetStopsRedirectsWithinDetectionTime(t *testing.T) {
	t.Parallel()
	const detection = 10 * time.Second
	r := startReplicaWith(t, Options{
		Janitor: JanitorConfig{SweepInterval: time.Hour, ReconcileInterval: time.Hour}}) // default probing
	createTargets(t, r, target(t, "us-a", "us"))
	k := key(1)
	fill(t, r, k, []string{"us-a"}, "us")
	waitRedirect(t, r, k, "us-a")
	front := sharedEnv(t).front
	for _, fault := range []int{http.StatusForbidden, http.StatusNotFound, http.StatusServiceUnavailable, -1} {
		if fault < 0 {
			front.Unreachable()
		} else {
			front.Fail(fault)
		}
		took := waitNoRedirect(t, r, detection+2*time.Second, k, "us-a")
		if took > detection {
			t.Fatalf("fault %d: redirects stopped after %s, the documented detection time is %s", fault, took, detection)
		}
		t.Logf("fault %d at the target (-1: unreachable): redirects stopped after %s", fault, took.Round(100*time.Millisecond))
		// No fills either while it is unhealthy.
		if miss := placeKey(t, r, key(99), "us-a"); miss.Fill != nil || miss.Reason != "no_candidates" {
			t.Fatalf("an unhealthy target is granted fills: %v", miss)
		}
		got, _ := r.admin.GetTarget(context.Background(), &pb.GetTargetRequest{Name: "us-a"})
		if !strings.Contains(got.GetTarget().GetUnhealthyReason(), "GET") {
			t.Fatalf("the target does not say why it is unhealthy: %v", got)
		}
		front.Heal()
		// Back within the detection time too: recovery takes ProbeRecoveries passed probes, 4s
		// with the defaults, so the 5s of waitRedirect left one second for the rest.
		eventually(t, detection, "redirects again after the target heals", func() bool {
			return placeKey(t, r, k, "us-a").Result == pb.PlaceResult_PLACE_RESULT_REDIRECT
		})
	}
}

// A target is probed as soon as it appears, not at the prober's next tick: with an hour between
// rounds, a target created while a round is under way, one created after it, and one deleted and
// created again are each healthy within seconds. A round is held under way by a target whose URL
// answers only when the probe gives up (registered, and judged unhealthy, before the replica
// starts, so that the round writes nothing that would wake the prober by chance).
func TestNewTargetsAreProbedAtOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	probing := make(chan struct{}, 1)
	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case probing <- struct{}{}:
		default:
		}
		<-r.Context().Done()
	}))
	t.Cleanup(hang.Close)
	cli, err := clientv3.New(sharedEtcdConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	reg := targets.NewRegistry(cli, testPrefix(t))
	slow := target(t, "slow", "us")
	slow.Uris, slow.UrlForm = []string{hang.URL + "/"}, &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: hang.URL + "/"}}
	created, err := reg.CreateTarget(ctx, slow)
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.SetHealth(ctx, &pb.TargetHealth{Target: "slow", TargetUid: created.Uid, Reason: "hangs"}); err != nil {
		t.Fatal(err)
	}

	r := startReplicaWith(t, Options{
		Janitor: JanitorConfig{ProbeInterval: time.Hour, ProbeTimeout: time.Second, SweepInterval: time.Hour, ReconcileInterval: time.Hour}})
	healthyWithin := func(what string) {
		t.Helper()
		start := time.Now()
		eventually(t, 5*time.Second, what, func() bool {
			got, err := r.admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "us-a"})
			return err == nil && got.Target.Healthy
		})
		t.Logf("%s after %s (probe interval 1h)", what, time.Since(start).Round(time.Millisecond))
	}
	select {
	case <-probing: // the first round is under way, held by the slow target's probe
	case <-time.After(10 * time.Second):
		t.Fatal("the first probe round did not start")
	}
	tg := target(t, "us-a", "us")
	if _, err := r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: tg}); err != nil {
		t.Fatal(err)
	}
	if metric(t, r, "detour_loop_rounds_total", `loop="probe"`) != 0 {
		t.Fatal("the first probe round ended before the target was created: the test proves nothing")
	}
	healthyWithin("a target created during a round healthy")

	// After the round: the next would come only after an hour.
	if n := metric(t, r, "detour_loop_rounds_total", `loop="probe"`); n != 1 {
		t.Fatalf("%v probe rounds, want 1", n)
	}
	if _, err := r.admin.DeleteTarget(ctx, &pb.DeleteTargetRequest{Name: "us-a"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the deleted target gone", func() bool {
		_, err := r.admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "us-a"})
		return code(err) == codes.NotFound
	})
	if _, err := r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: tg}); err != nil {
		t.Fatal(err)
	}
	healthyWithin("the recreated target healthy")
}

// Changing a target's bucket, or deleting a target and creating one of the same name, never
// redirects to bytes that are not where the records said; the stale records are retired and their
// bytes deleted.
func TestStoreMovesAndRecreatedTargetsNeverRedirectToMissingBytes(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	ctx := context.Background()
	tg := target(t, "us-a", "us")
	createTargets(t, r, tg)
	old, _ := fill(t, r, key(1), []string{"us-a"}, "us")
	waitRedirect(t, r, key(1), "us-a")

	// The bucket moves.
	cur, err := r.admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "us-a"})
	if err != nil {
		t.Fatal(err)
	}
	moved := target(t, "us-a-new", "us") // makes the bucket and its URL
	cur.Target.Store, cur.Target.UrlForm, cur.Target.Uris = moved.Store, moved.UrlForm, moved.Uris
	if _, err := r.admin.UpdateTarget(ctx, &pb.UpdateTargetRequest{Target: cur.Target}); err != nil {
		t.Fatal(err)
	}
	waitNoRedirect(t, r, 2*time.Second, key(1), "us-a")
	eventually(t, 5*time.Second, "the moved store's record retired and its bytes deleted", func() bool {
		_, there := storedBytes(t, old.Bucket, old.ObjectName)
		return !there && objectCount(t, r) == 0
	})

	// Delete and recreate under the same name and the same bucket.
	waitHealth(t, r, "us-a", true)
	second, _ := fill(t, r, key(2), []string{"us-a"}, "us")
	waitRedirect(t, r, key(2), "us-a")
	if _, err := r.admin.DeleteTarget(ctx, &pb.DeleteTargetRequest{Name: "us-a"}); err != nil {
		t.Fatal(err)
	}
	again := target(t, "us-a", "us")
	again.Store, again.UrlForm, again.Uris = moved.Store, moved.UrlForm, moved.Uris
	createTargets(t, r, again)
	if resp := placeKey(t, r, key(2), "us-a"); resp.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatalf("a recreated target brought back a deleted target's record: %v", resp)
	}
	eventually(t, 5*time.Second, "the deleted target's record retired and its bytes deleted", func() bool {
		_, there := storedBytes(t, second.Bucket, second.ObjectName)
		return !there && objectCount(t, r) == 0
	})
}

// Purged and expired objects leave the bucket; objects no record or claim accounts for (failed
// fills) are deleted by the reconciler once old enough, and live fills are left alone.
func TestStoredBytesFollowTheirRecords(t *testing.T) {
	t.Parallel()
	r := startReplicaWith(t, Options{
		Janitor: JanitorConfig{ProbeInterval: 100 * time.Millisecond, ProbeTimeout: 2 * time.Second, SweepInterval: 200 * time.Millisecond,
			ReconcileInterval: time.Hour, OrphanAge: 500 * time.Millisecond, GarbageGrace: 100 * time.Millisecond}})
	ctx := context.Background()
	createTargets(t, r, target(t, "us-a", "us"))
	purged, _ := fill(t, r, key(1), []string{"us-a"}, "us")
	waitRedirect(t, r, key(1), "us-a")
	// Every stored object is held (the emulator refuses to delete a held object, as GCS does):
	// the deletions below succeed only because Detour releases the hold first.
	held := func(g *pb.FillGrant) {
		t.Helper()
		if a, err := sharedEnv(t).store.Stat(ctx, g.Bucket, g.ObjectName); err != nil || !a.TemporaryHold {
			t.Fatalf("%s: %+v %v, want held", g.ObjectName, a, err)
		}
	}
	held(purged)
	if resp, err := r.admin.DeleteObjects(ctx, &pb.DeleteObjectsRequest{Key: key(1)}); err != nil || resp.Deleted != 1 {
		t.Fatalf("purge: %v %v", resp, err)
	}
	// Gone from placement at once (the purge waits for the snapshot), and from the bucket soon.
	if placeKey(t, r, key(1), "us-a").Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatal("a purged object is still redirected to")
	}
	eventually(t, 5*time.Second, "purged bytes deleted", func() bool {
		_, there := storedBytes(t, purged.Bucket, purged.ObjectName)
		return !there
	})

	// An orphan: a fill that uploaded and died without reporting (its claim released).
	orphan := grant(t, r, key(2), []string{"us-a"}, "us")
	upload(t, orphan, key(2), []byte("bytes of a fill that never reported"))
	held(orphan)
	if _, err := r.place.AbortFill(ctx, &pb.AbortFillRequest{Key: key(2), Token: orphan.Token}); err != nil {
		t.Fatal(err)
	}
	// Bytes whose record this release cannot read (a later release's format, during an upgrade):
	// not in the index, but not an orphan either.
	unread := grant(t, r, key(4), []string{"us-a"}, "us")
	upload(t, unread, key(4), []byte("bytes a newer release recorded"))
	if _, err := r.place.AbortFill(ctx, &pb.AbortFillRequest{Key: key(4), Token: unread.Token}); err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(sharedEtcdConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	// A compact record with a flag no release knows yet (0x80).
	if _, err := cli.Put(ctx, testPrefix(t)+"objects/"+key(4)+"/us-a", "\x00\x01\x80"); err != nil {
		t.Fatal(err)
	}
	// A fill in progress: claimed, uploaded, not reported yet.
	live := grant(t, r, key(3), []string{"us-a"}, "us")
	liveRes := upload(t, live, key(3), []byte("bytes of a fill about to report"))
	time.Sleep(600 * time.Millisecond) // both older than OrphanAge
	if err := r.srv.Janitor().Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if _, there := storedBytes(t, orphan.Bucket, orphan.ObjectName); there {
		t.Fatal("the orphan was not deleted")
	}
	if _, there := storedBytes(t, live.Bucket, live.ObjectName); !there {
		t.Fatal("the reconciler deleted a claimed fill's bytes")
	}
	if _, there := storedBytes(t, unread.Bucket, unread.ObjectName); !there {
		t.Fatal("the reconciler deleted bytes whose record it could not read")
	}
	if got := testbed.Metric(t, "http://"+r.metricsAddr()+"/metrics", "detour_reconcile_objects_total", `outcome="orphan_kept_recorded"`); got != 1 {
		t.Fatalf("%v objects kept for their record, want 1", got)
	}
	if _, err := r.place.ReportFill(ctx, report(key(3), live, liveRes)); err != nil {
		t.Fatalf("the live fill's report: %v", err)
	}
	waitRedirect(t, r, key(3), "us-a")
	// The canary is not an orphan.
	if err := r.srv.Janitor().Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if _, there := storedBytes(t, live.Bucket, "hg/"+CanaryName); !there {
		t.Fatal("the reconciler deleted the prober's canary")
	}
}

// Objects that are redirected to are kept past their TTL (extended without a write per redirect);
// objects nobody asks for expire.
func TestUsedObjectsAreExtendedUnusedExpire(t *testing.T) {
	t.Parallel()
	r := startReplicaWith(t, Options{
		Janitor: JanitorConfig{ProbeInterval: 100 * time.Millisecond, ProbeTimeout: 2 * time.Second, SweepInterval: 200 * time.Millisecond,
			ReconcileInterval: time.Hour, ExtendInterval: 200 * time.Millisecond}})
	ctx := context.Background()
	createTargets(t, r, target(t, "us-a", "us"))
	if _, err := r.admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: &pb.Policy{ObjectTtl: durationpb.New(3 * time.Second)}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "policy in the snapshot", func() bool {
		p, err := r.admin.GetPolicy(ctx, &pb.GetPolicyRequest{})
		return err == nil && p.Policy.ObjectTtl != nil
	})
	fill(t, r, key(1), []string{"us-a"}, "us")
	fill(t, r, key(2), []string{"us-a"}, "us")
	waitRedirect(t, r, key(1), "us-a")
	// key(1) is asked for every 100ms for 6s (twice its TTL); key(2) never again.
	deadline := time.Now().Add(6 * time.Second)
	for time.Now().Before(deadline) {
		if resp := placeKey(t, r, key(1), "us-a"); resp.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
			t.Fatalf("a used object expired: %v", resp)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if placeKey(t, r, key(2), "us-a").Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatal("an unused object outlived its TTL")
	}
	body := httpGet(t, "http://"+r.metricsAddr()+"/metrics")
	if !strings.Contains(body, "detour_objects_extended_total") || strings.Contains(body, "detour_objects_extended_total 0\n") {
		t.Fatalf("no extensions counted:\n%s", body)
	}
}

// A claim whose write outcome is unknown (etcd committed it but answered after the claim's
// deadline) is released at once: nobody would fill it, and it would block the key's fills for the
// claim TTL. etcd is reached through a proxy that delays its answers past the claim timeout.
//
// Serial: its claims must succeed within 30ms until the delay starts.
func TestClaimsCommittedPastTheirDeadlineAreReleased(t *testing.T) {
	var delay atomic.Int64
	slow := delayAnswers(t, strings.TrimPrefix(sharedEtcd(t), "https://"), &delay)
	r := startReplicaWith(t, Options{EtcdEndpoints: []string{"https://" + slow}, WriteTimeout: 5 * time.Second,
		ClaimTimeout: 30 * time.Millisecond, Janitor: fastJanitor})
	createTargets(t, r, target(t, "us-a", "us"))
	waitHealth(t, r, "us-a", true)
	setPolicy(t, r, func(p *pb.Policy) { p.MinOccurrences = 1 }) // this test is about the first miss
	grant(t, r, key(199), []string{"us-a"}, "us")                // the claims' shared lease is granted now
	delay.Store(int64(100 * time.Millisecond))
	for i := range 5 {
		resp, err := r.place.Place(context.Background(), &pb.PlaceRequest{Key: key(200 + i), Command: "manifestdata",
			AcceptedTargets: []string{"us-a"}, AgentRegion: "us", AgentId: "a1"})
		if err != nil || resp.Fill != nil {
			t.Fatalf("Place with a claim that cannot be confirmed in time: %v %v", resp, err)
		}
		time.Sleep(1100 * time.Millisecond) // claims are skipped for a second after a failure
	}
	eventually(t, 5*time.Second, "no claim left behind", func() bool {
		snap := r.srv.svc.w.Snapshot()
		held := 0
		for i := range 5 {
			if _, ok := snap.Claim(key(200 + i)); ok {
				held++
			}
		}
		return held == 0
	})
	if got := testbed.Metric(t, "http://"+r.metricsAddr()+"/metrics", "detour_fill_reports_total", `outcome="orphan_released"`); got < 1 {
		t.Fatalf("%v orphaned claims released", got)
	}
}

// delayAnswers is a TCP proxy to addr that forwards requests at once and answers after *d.
func delayAnswers(t *testing.T, addr string, d *atomic.Int64) string {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", addr)
			if err != nil {
				c.Close()
				continue
			}
			go func() { _, _ = io.Copy(up, c); up.Close() }()
			go func() {
				defer c.Close()
				buf := make([]byte, 64<<10)
				for {
					n, err := up.Read(buf)
					if n > 0 {
						chunk := append([]byte(nil), buf[:n]...)
						time.Sleep(time.Duration(d.Load()))
						if _, werr := c.Write(chunk); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return lis.Addr().String()
}

// How long agents may reuse a redirect: never across regions (each one counts toward an
// in-region copy) or to a draining target, at most a quarter of a signed URL's life, never past
// the object's expiry, and within the control plane's maximum.
func TestRedirectCacheLifetimes(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	s := r.srv.svc
	if _, err := r.admin.SetPolicy(context.Background(), &pb.SetPolicyRequest{Policy: &pb.Policy{SignedUrlTtl: durationpb.New(2 * time.Minute)}}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.admin.GetPolicy(context.Background(), &pb.GetPolicyRequest{}); err != nil { // waits for the snapshot
		t.Fatal(err)
	}
	snap := s.w.Snapshot()
	now := time.Now()
	public := &pb.Target{Name: "t", Region: "us", State: pb.TargetState_TARGET_STATE_ACTIVE,
		UrlForm: &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: "https://x/"}}}
	signed := proto.Clone(public).(*pb.Target)
	signed.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_Signed{Signed: &pb.SignedUrls{}}}
	draining := proto.Clone(public).(*pb.Target)
	draining.State = pb.TargetState_TARGET_STATE_DRAINING
	forever := &targets.Object{}
	soon := &targets.Object{Expires: now.Add(10 * time.Second).UnixNano()}
	for _, c := range []struct {
		name   string
		t      *pb.Target
		o      *targets.Object
		region string
		want   time.Duration
	}{
		{"in region", public, forever, "us", time.Minute},
		{"across regions", public, forever, "eu", 0},
		{"draining", draining, forever, "us", 0},
		{"signed", signed, forever, "us", 30 * time.Second},
		{"expiring", public, soon, "us", 10 * time.Second},
	} {
		got := s.cacheFor(snap, c.t, c.o, c.region, now)
		if got != c.want {
			t.Errorf("%s: cache for %s, want %s", c.name, got, c.want)
		}
	}
}

// Every replica's start lists its targets' buckets (the store guard); the janitor elected with it
// does not list them all a second time at once: its first reconcile comes an interval into its
// term (an hour here), or when asked.
func TestAJanitorsFirstReconcileWaitsAnInterval(t *testing.T) {
	r := startReplica(t)
	eventually(t, 10*time.Second, "elected, and a few sweeps done", func() bool {
		return metric(t, r, "detour_janitor_elected") == 1 && metric(t, r, "detour_loop_rounds_total", `loop="sweep"`) >= 3
	})
	if n := metric(t, r, "detour_loop_rounds_total", `loop="reconcile"`); n != 0 {
		t.Fatalf("%v reconcile rounds at the janitor's term start, want 0", n)
	}
	if err := r.srv.Janitor().Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := metric(t, r, "detour_loop_rounds_total", `loop="reconcile"`); n != 1 {
		t.Fatalf("%v reconcile rounds after one was asked for, want 1", n)
	}
}
