package chaos

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"cloud.google.com/go/storage"
	"google.golang.org/api/googleapi"
	"google.golang.org/api/option"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
)

// The store goes down (its API and its client-facing URL stop answering) and comes back, under a
// load of stored keys and new ones. The agent answers every request, with the origin's bytes:
// fills fail and are dropped, and once the control plane's prober has taken the target out, Place
// answers inline. A real client does not fall back from a location that fails, so redirects issued
// before the prober noticed fail at the store: the test counts them apart, and fails if any was
// issued later than the prober's detection time (ProbeFailures·ProbeInterval + ProbeTimeout). When
// the store is back, redirects resume.
func TestStoreDownAndBack(t *testing.T) {
	const probeInterval, probeFailures = 500 * time.Millisecond, 2
	const detection = probeFailures*probeInterval + probeInterval // the probe timeout defaults to the interval
	r := newRig(t, rigOptions{cpFlags: []string{"--probe-interval", probeInterval.String(),
		"--probe-failures", fmt.Sprint(probeFailures), "--probe-recoveries", "2"}})
	ks := r.newKeyspace("store", 64, pick(1000, 8000), 32<<10)
	r.warm(ks)
	l := r.startLoad(ks, loadOptions{clients: pick(8, 16), freshEvery: 4})
	time.Sleep(pick(time.Second, 5*time.Second))
	r.front.Unreachable()
	r.api.Unreachable()
	down := l.now()
	time.Sleep(pick(3*time.Second, 15*time.Second))
	r.front.Heal()
	r.api.Heal()
	healed := l.now()
	time.Sleep(pick(3*time.Second, 10*time.Second))
	f := l.finish()
	if rec, ok := f.firstRedirectAfter(healed); ok {
		f.recovery = rec
	}
	storeFailed := f.count(func(rc record) bool { return rc.fetchFail })
	var lastRedirect time.Duration // the last redirect issued during the outage, after its start
	for _, rc := range f.recs {
		if rc.start >= down && rc.start < healed && (rc.redirected || rc.fetchFail) {
			lastRedirect = max(lastRedirect, rc.start-down)
		}
	}
	share := func(from, to time.Duration) float64 {
		in := func(rc record) bool { return !rc.fresh && rc.start >= from && rc.start < to }
		return 100 * float64(f.count(func(rc record) bool { return in(rc) && rc.redirected })) / float64(max(1, f.count(in)))
	}
	f.extra = fmt.Sprintf("outage %s: locations that failed at the store %d (last redirect %s into the outage, detection bound %s); stored keys redirected before %.0f%%, after recovery %.0f%%",
		(healed - down).Round(time.Millisecond), storeFailed, lastRedirect.Round(time.Millisecond), detection,
		share(0, down), share(healed+f.recovery, l.now()))
	agentFailed := f.count(func(rc record) bool { return rc.failed && !rc.fetchFail })
	f.report(t, "store-down", true)
	if agentFailed > 0 {
		t.Fatalf("%d requests failed at the agent; first: %v", agentFailed, f.errs)
	}
	// One probe period of slack for the watch to reach the agent and requests already in Place.
	if lastRedirect > detection+probeInterval {
		t.Fatalf("a redirect was issued %s into the outage; the prober's detection time is %s", lastRedirect, detection)
	}
	if f.recovery < 0 {
		t.Fatal("no redirect after the store came back")
	}
}

// storeChange is one way a stored object's bytes change behind Detour's back.
type storeChange struct {
	name   string
	change func(data []byte) []byte // the new bytes; nil: delete
}

var storeChanges = []storeChange{
	{"overwrite", func(d []byte) []byte { // other bytes of the same size
		out := make([]byte, len(d))
		for i, b := range d {
			out[i] = ^b
		}
		return out
	}},
	{"truncate", func(d []byte) []byte { return d[:len(d)/2] }},
	{"delete", func([]byte) []byte { return nil }},
}

// A stored object is overwritten with other bytes of the same size, truncated, or deleted through
// the store's API (its hold released first: the store refuses all three while Detour holds it,
// which the test checks) while clients ask for it. Location URLs name the verified generation, so
// no client is ever handed other bytes: the answers between the change and Detour's noticing it
// are locations that fail (404), which a real client does not survive. The bucket's notification
// retires the record: each change may cost at most one client answer, and nothing is redirected to
// the changed object after the bound of DESIGN.md invariant 11, 10 s (the test asserts no failure
// at all after the record is gone). Each victim is asked twice a second, by a client of its own, so
// that "one answer" means detection within half a second.
func TestStoreObjectsChangedBehindDetour(t *testing.T) {
	const bound = 10 * time.Second
	const victimPace = 500 * time.Millisecond
	r := newRig(t, rigOptions{})
	ks := r.newKeyspace("changed", pick(24, 64), 0, 32<<10)
	r.warm(ks)
	ctx := context.Background()
	st, err := blob.NewStore(ctx, blob.Options{Endpoint: r.gcs.Endpoint()})
	r.must(err)
	defer st.Close()
	raw, err := storage.NewClient(ctx, option.WithEndpoint(r.gcs.Endpoint()), option.WithoutAuthentication())
	r.must(err)
	defer raw.Close()

	// One victim per kind of change, among the hot keys; the rest is background load.
	c, rr := r.client(4)
	type victim struct {
		storeChange
		q         request
		node      string
		object    string // name in the bucket
		key       string
		at        time.Duration // when the change was made (load time)
		detection time.Duration // from the change to the record's retirement
	}
	victims := make([]*victim, len(storeChanges))
	for i, sc := range storeChanges {
		q := ks.hot[i]
		res, err := c.CommandNoFollow(ctx, command, q.args, rr)
		r.must(err)
		if !res.Redirected {
			t.Fatalf("victim %s not redirected", sc.name)
		}
		u, err := url.Parse(res.Status.Location.URL)
		r.must(err)
		object := strings.TrimPrefix(u.Path, "/"+bucket+"/")
		victims[i] = &victim{storeChange: sc, q: q, node: q.args["nodes"].([]any)[0].(string), object: object,
			key: object[len(object)-64:]}
	}
	background := &keyspace{hot: ks.hot[len(victims):]}
	l := r.startLoad(background, loadOptions{clients: pick(6, 16)})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, v := range victims {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(victimPace)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				rec := l.one(v.q, false)
				l.mu.Lock()
				l.recs = append(l.recs, rec)
				l.mu.Unlock()
			}
		}()
	}
	time.Sleep(pick(time.Second, 3*time.Second))
	for _, v := range victims {
		a, err := st.Stat(ctx, bucket, v.object)
		r.must(err)
		data, err := r.gcs.Object(bucket, v.object)
		r.must(err)
		obj := raw.Bucket(bucket).Object(v.object)
		// Held: the store refuses the change outright.
		if err := change(ctx, obj, v.change(data)); !isForbidden(err) {
			t.Fatalf("%s of a held object: %v, want HTTP 403", v.name, err)
		}
		_, err = st.Hold(ctx, bucket, v.object, a.Generation, false)
		r.must(err)
		v.at = l.now()
		r.must(change(ctx, obj, v.change(data)))
		for {
			list, err := r.admin.ListObjects(ctx, &pb.ListObjectsRequest{Target: target, KeyPrefix: v.key})
			r.must(err)
			if len(list.Objects) == 0 {
				v.detection = l.now() - v.at
				break
			}
			if l.now()-v.at > bound {
				t.Fatalf("%s: the record is still there %s after the change", v.name, bound)
			}
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(pick(500*time.Millisecond, 3*time.Second))
	}
	time.Sleep(pick(time.Second, 3*time.Second))
	close(stop)
	wg.Wait()
	f := l.finish()
	failedOther := 0
	var parts []string
	for _, rc := range f.recs {
		if rc.failed && !slices.ContainsFunc(victims, func(v *victim) bool { return v.node == rc.node }) {
			failedOther++
		}
	}
	for _, v := range victims {
		bad, asked, after := 0, 0, 0
		for _, rc := range f.recs {
			if rc.node != v.node || rc.end < v.at {
				continue // answered before the change
			}
			asked++
			if rc.failed || rc.wrong {
				bad++
				if rc.start > v.at+v.detection {
					after++
				}
			}
		}
		parts = append(parts, fmt.Sprintf("%s: detected in %s, %d of %d answers after it failed (%d after detection)",
			v.name, v.detection.Round(time.Millisecond), bad, asked, after))
		if bad > 1 || after > 0 {
			defer t.Errorf("%s: %d answers failed after the change (at most 1), %d of them after the record was retired", v.name, bad, after)
		}
	}
	f.extra = strings.Join(parts, "; ")
	f.report(t, "store-objects-changed", true)
	if failedOther > 0 {
		t.Fatalf("%d answers for keys nobody changed failed; first: %v", failedOther, f.errs)
	}
}

// change writes data over obj without conditions (nil: deletes it), as another tool would.
func change(ctx context.Context, obj *storage.ObjectHandle, data []byte) error {
	if data == nil {
		return obj.Delete(ctx)
	}
	w := obj.NewWriter(ctx)
	w.ContentType = "application/mercurial-cbor"
	w.Write(data)
	return w.Close()
}

func isForbidden(err error) bool {
	var g *googleapi.Error
	return errors.As(err, &g) && g.Code == http.StatusForbidden
}
