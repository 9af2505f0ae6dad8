package controlplane

import (
	"context"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// What listingFront does with object listings.
const (
	listingsPass       = iota // what the emulator answers
	listingsEmpty             // an empty bucket, however full it is
	listingsFailMidWay        // pages of 5 objects (the client asks for 1000; a store may answer fewer), every later page refused
)

// listingFront is a proxy to the test's emulator, used as a replica's GCS endpoint, whose object
// listings answer as mode says; everything else passes.
type listingFront struct {
	endpoint string
	mode     atomic.Int32
	refused  atomic.Int64 // later pages refused
}

func newListingFront(t *testing.T) *listingFront {
	t.Helper()
	f := &listingFront{}
	f.endpoint = listingProxy(t, func(w http.ResponseWriter, r *http.Request) bool {
		switch f.mode.Load() {
		case listingsEmpty:
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprint(w, `{"kind":"storage#objects"}`)
			return true
		case listingsFailMidWay:
			q := r.URL.Query()
			if q.Get("pageToken") != "" {
				f.refused.Add(1)
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusForbidden)
				fmt.Fprint(w, `{"error":{"code":403,"message":"a later page refused by the test"}}`)
				return true
			}
			q.Set("maxResults", "5")
			r.URL.RawQuery = q.Encode()
		}
		return false
	})
	return f
}

// ownPrefix is an etcd prefix of t's own (a subtest's), outside every other test's.
func ownPrefix(t *testing.T) string {
	return "/detour-test/" + strings.NewReplacer("/", "-", " ", "_").Replace(t.Name()) + "/"
}

// fillMany fills keys 0..n-1 at target and waits until each is redirected to; it returns their
// grants.
func fillMany(t *testing.T, r *replica, target string, n int) []*pb.FillGrant {
	t.Helper()
	gs := make([]*pb.FillGrant, n)
	for i := range n {
		gs[i], _ = fill(t, r, key(i), []string{target}, "us")
	}
	for i := range n {
		waitRedirect(t, r, key(i), target)
	}
	return gs
}

// recordsAt counts target's records as r's snapshot holds them once it includes every write made
// before the call: a key filled now is redirected to only once the snapshot has it, and with it
// every earlier write (retirements included).
func recordsAt(t *testing.T, r *replica, target string, marker int) int {
	t.Helper()
	fill(t, r, key(marker), []string{target}, "us")
	waitRedirect(t, r, key(marker), target)
	list, err := r.admin.ListObjects(context.Background(), &pb.ListObjectsRequest{Target: target, PageSize: 1000})
	if err != nil {
		t.Fatal(err)
	}
	return len(list.Objects) - 1
}

// The janitor's reconcile retires the records whose objects a listing misses only while they are
// few: up to max(3, share × the target's records) in a round. More (a bucket emptied, five of
// twenty objects gone with the default share of 0.1) retire none, counted and logged; the records
// stay and are still redirected to. A share of 1 turns the check off.
func TestReconcileRetiresOnlyAFewRecordsAtOnce(t *testing.T) {
	t.Parallel()
	const records = 20
	sharedEnv(t) // the subtests' emulator, stopped when they have all ended
	for _, c := range []struct {
		name        string
		share       float64 // 0: the default
		lose        int     // objects deleted from the bucket
		wantRetired int
	}{
		{"one of twenty lost", 0, 1, 1},
		{"three of twenty lost, the floor", 0, 3, 3},
		{"five of twenty lost", 0, 5, 0},
		{"the bucket emptied", 0, records, 0},
		{"five of twenty lost, share 0.25", 0.25, 5, 5},
		{"the bucket emptied, share 1", 1, records, records},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			jc := fastJanitor
			jc.MaxRetireShare = c.share
			r := startReplicaWith(t, Options{WriteTimeout: time.Second, EtcdPrefix: ownPrefix(t), Janitor: jc})
			name := fmt.Sprintf("us-%03.0f-%d", c.share*100, c.lose)
			createTargets(t, r, target(t, name, "us"))
			gs := fillMany(t, r, name, records)
			for _, g := range gs[:c.lose] {
				if err := sharedEnv(t).store.Delete(ctx, g.Bucket, g.ObjectName, 0); err != nil {
					t.Fatal(err)
				}
			}
			if err := r.srv.Janitor().Reconcile(ctx); err != nil {
				t.Fatal(err)
			}
			refused := 0.0
			if c.wantRetired == 0 {
				refused = 1
			}
			if got := metric(t, r, "detour_reconcile_missing_objects_total", `target="`+name+`"`); got != float64(c.wantRetired) {
				t.Errorf("%v records retired as missing, want %d", got, c.wantRetired)
			}
			if got := metric(t, r, "detour_reconcile_refused_total", `target="`+name+`"`, `path="reconcile"`); got != refused {
				t.Errorf("%v refusals counted, want %v", got, refused)
			}
			if got := recordsAt(t, r, name, records); got != records-c.wantRetired {
				t.Fatalf("%d records left, want %d", got, records-c.wantRetired)
			}
			if c.wantRetired == 0 {
				for i := range c.lose {
					if got := placeKey(t, r, key(i), name); got.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
						t.Fatalf("key %d, kept by the refused round: %v", i, got)
					}
				}
			}
		})
	}
}

// A replica that starts while its target's listing answers empty (the bucket is full) retires
// nothing: the refusal is counted on both paths (its confirmation at start, its janitor's
// reconcile), the target stays unverified and its records are checked one by one (an intact one
// redirected to, one whose object really is gone retired), and the confirmation is tried again a
// reconcile interval later, trusting the target once the listing is right.
func TestEmptyListingAtStartRetiresNothing(t *testing.T) {
	t.Parallel()
	const records = 20
	ctx := context.Background()
	acc := []string{"us-a"}
	first := startReplica(t)
	createTargets(t, first, target(t, "us-a", "us"))
	gs := fillMany(t, first, "us-a", records)
	first.shutdown(t)
	if err := sharedEnv(t).store.Delete(ctx, gs[0].Bucket, gs[0].ObjectName, 0); err != nil {
		t.Fatal(err)
	}

	front := newListingFront(t)
	front.mode.Store(listingsEmpty)
	jc := fastJanitor
	jc.ReconcileInterval = time.Second
	var log logBuffer
	r := startReplicaWith(t, Options{WriteTimeout: time.Second, GCSEndpoint: front.endpoint, Janitor: jc, Log: log.logger()})
	eventually(t, 10*time.Second, "both paths refused", func() bool {
		return metric(t, r, "detour_reconcile_refused_total", `path="confirm"`) >= 1 &&
			metric(t, r, "detour_reconcile_refused_total", `path="reconcile"`) >= 1
	})
	if n := metric(t, r, "detour_store_unverified_targets"); n != 1 {
		t.Fatalf("%v unverified targets after a refused confirmation, want 1", n)
	}
	for i := 1; i < records; i++ {
		if got := placeKey(t, r, key(i), acc...); got.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
			t.Fatalf("intact key %d: %v", i, got)
		}
	}
	if got := placeKey(t, r, key(0), acc...); got.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatalf("key 0, deleted, redirected to: %v", got)
	}
	eventually(t, 5*time.Second, "the deleted object's record retired by its own check", func() bool {
		return len(copiesAt(t, r, "us-a", key(0))) == 0
	})
	if n := metric(t, r, "detour_objects_retired_total", `reason="store_deleted"`); n != 1 {
		t.Fatalf("%v records retired, want the one checked", n)
	}
	if got := recordsAt(t, r, "us-a", records); got != records-1 {
		t.Fatalf("%d records left, want %d", got, records-1)
	}
	// Tried again: still refused while the listing is empty, then trusted.
	refusals := metric(t, r, "detour_reconcile_refused_total", `path="confirm"`)
	eventually(t, 10*time.Second, "the confirmation tried again", func() bool {
		return metric(t, r, "detour_reconcile_refused_total", `path="confirm"`) > refusals
	})
	if n := metric(t, r, "detour_reconcile_refused_total", `path="reconcile"`); n < 2 {
		t.Fatalf("%v reconcile rounds refused, want every round's", n)
	}
	// One warning per path, however many rounds were refused, naming what the operator needs.
	warned := regexp.MustCompile(`level=WARN msg="a listing of the target's bucket misses more of its records than one round may retire; none retired.*raise --reconcile-max-retire-share[^"]*" target=us-a bucket=bucket-us-a prefix=hg/ path=(\w+) would_retire=\d+ records=\d+ max_retire_share=0.1 allowed=3`)
	if got := warned.FindAllStringSubmatch(log.String(), -1); len(got) != 2 || got[0][1] == got[1][1] {
		t.Fatalf("refusal warnings %q, want one per path in:\n%s", got, log.String())
	}
	front.mode.Store(listingsPass)
	eventually(t, 10*time.Second, "the target confirmed once its listing is right", func() bool {
		return metric(t, r, "detour_store_unverified_targets") == 0
	})
	eventually(t, 5*time.Second, "the end of the refusals logged on both paths", func() bool {
		return strings.Count(log.String(), "retires its missing records again") == 2
	})
	if got := recordsAt(t, r, "us-a", records+1); got != records {
		t.Fatalf("%d records left, want %d", got, records)
	}
}

// A listing whose later page fails retires nothing on either path, even with the share check
// turned off: what the first pages did not show is not missing. The confirmation keeps the target
// unverified.
func TestListingFailingMidWayRetiresNothing(t *testing.T) {
	t.Parallel()
	const records = 20
	ctx := context.Background()
	first := startReplica(t)
	createTargets(t, first, target(t, "us-a", "us"))
	fillMany(t, first, "us-a", records)
	first.shutdown(t)

	front := newListingFront(t)
	front.mode.Store(listingsFailMidWay)
	jc := fastJanitor
	jc.MaxRetireShare = 1
	r := startReplicaWith(t, Options{WriteTimeout: time.Second, GCSEndpoint: front.endpoint, Janitor: jc})
	if err := r.srv.Janitor().Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "both paths' listings cut", func() bool { return front.refused.Load() >= 2 })
	if got := metric(t, r, "detour_reconcile_objects_total", `target="us-a"`, `outcome="checked"`); got == 0 || got >= records {
		t.Fatalf("the reconcile read %v records' objects, want the first page's", got)
	}
	if n := metric(t, r, "detour_store_unverified_targets"); n != 1 {
		t.Fatalf("%v unverified targets after a failed listing, want 1", n)
	}
	if got := recordsAt(t, r, "us-a", records); got != records {
		t.Fatalf("%d records left, want %d", got, records)
	}
	if n := metric(t, r, "detour_reconcile_missing_objects_total", `target="us-a"`); n != 0 {
		t.Fatalf("%v records retired as missing", n)
	}
}

// An index that lost its records (here: a control plane on another etcd prefix, the same target
// and bucket) sees every object in the bucket as the bytes of a failed fill. Its reconcile deletes
// none of them, counted under path "orphans", unless the share lets it.
func TestReconcileDeletesOnlyAFewOrphansAtOnce(t *testing.T) {
	t.Parallel()
	const objects = 20
	sharedEnv(t) // the subtests' emulator, stopped when they have all ended
	for _, c := range []struct {
		name        string
		share       float64 // 0: the default
		wantDeleted int
	}{
		{"the index lost every record", 0, 0},
		{"the index lost every record, share 1", 1, objects},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			name := fmt.Sprintf("us-orphans-%03.0f", c.share*100)
			first := startReplicaWith(t, Options{WriteTimeout: time.Second, EtcdPrefix: ownPrefix(t) + "first/", Janitor: fastJanitor})
			createTargets(t, first, target(t, name, "us"))
			gs := fillMany(t, first, name, objects)
			first.shutdown(t)

			jc := fastJanitor
			jc.MaxRetireShare, jc.OrphanAge = c.share, time.Nanosecond
			second := startReplicaWith(t, Options{WriteTimeout: time.Second, EtcdPrefix: ownPrefix(t) + "second/", Janitor: jc})
			createTargets(t, second, target(t, name, "us"))
			if err := second.srv.Janitor().Reconcile(ctx); err != nil {
				t.Fatal(err)
			}
			left := 0
			for _, g := range gs {
				if _, there := storedBytes(t, g.Bucket, g.ObjectName); there {
					left++
				}
			}
			if left != objects-c.wantDeleted {
				t.Fatalf("%d of %d objects left in the bucket, want %d", left, objects, objects-c.wantDeleted)
			}
			// The elected janitor may also have reconciled on its own since it started: every
			// refused round counts, and none may count when the share lets the deletion through.
			got := metric(t, second, "detour_reconcile_refused_total", `target="`+name+`"`, `path="orphans"`)
			if c.wantDeleted == 0 && got < 1 || c.wantDeleted > 0 && got != 0 {
				t.Errorf("%v refusals counted, want at least one only when none was deleted", got)
			}
		})
	}
}
