package controlplane

import (
	"context"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Callers that cancel their Place while its fill claim is being written (clients that hang up, as
// seen through an agent) do not stop other callers' fills: only etcd's failures open the claim
// breaker. Every honest Place during the storm is granted its fill, and the cancelled calls are
// counted as cancelled.
func TestCancelledPlacesDoNotFailHonestClaims(t *testing.T) {
	// The target stays healthy however loaded the machine: probing is not this test's subject.
	j := fastJanitor
	j.ProbeTimeout, j.ProbeFailures = 5*time.Second, 1000
	r := startReplicaWith(t, Options{EtcdEndpoints: []string{startEtcd(t).Endpoint()}, WriteTimeout: time.Second,
		Janitor: j, ClaimRate: -1}) // one agent identity makes every call: the per-agent claim rate is not this test's
	createTargets(t, r, target(t, "us-a", "us"))
	setPolicy(t, r, func(p *pb.Policy) { p.MinOccurrences = 1 }) // every first miss claims
	grant(t, r, key(0), []string{"us-a"}, "us")                  // the claims' shared lease exists

	const cancellers, perCanceller, honest = 16, 25, 60
	place := func(ctx context.Context, k string) (*pb.PlaceResponse, error) {
		return r.place.Place(ctx, &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: []string{"us-a"},
			AgentRegion: "us", AgentId: "a1"})
	}
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		settled = 0 // cancelled calls that got an answer anyway
	)
	for c := range cancellers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perCanceller {
				k := key(1000 + c*perCanceller + i)
				ctx, cancel := context.WithCancel(context.Background())
				time.AfterFunc(time.Duration(rand.IntN(3000))*time.Microsecond, cancel)
				_, err := place(ctx, k)
				cancel()
				if err == nil {
					mu.Lock()
					settled++
					mu.Unlock()
				}
			}
		}()
	}
	var failed []string
	for i := range honest {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		resp, err := place(ctx, key(5000+i))
		cancel()
		switch {
		case err != nil:
			failed = append(failed, err.Error())
		case resp.Fill == nil:
			failed = append(failed, resp.Reason)
		}
		time.Sleep(time.Millisecond)
	}
	wg.Wait()
	if len(failed) > 0 {
		t.Fatalf("%d of %d honest Places during %d cancelled ones were not granted a fill: %v",
			len(failed), honest, cancellers*perCanceller, failed[:min(len(failed), 5)])
	}
	cancelled := metric(t, r, "detour_fill_reports_total", `outcome="cancelled"`)
	if cancelled == 0 {
		t.Fatalf("no Place was counted as cancelled (%d of %d answered before their cancel)", settled, cancellers*perCanceller)
	}
	t.Logf("%d cancelled Places (%d answered before the cancel, %.0f counted cancelled); %d honest Places all granted",
		cancellers*perCanceller, settled, cancelled, honest)
}

// A caller that cancels while its claim is being written (etcd answers slowly here, through a
// proxy) is answered cancelled: the claim etcd committed is released at once instead of blocking
// the key's fills for the claim TTL, and a Place right after it is granted its fill.
func TestCancelledClaimIsReleased(t *testing.T) {
	etcd := startEtcd(t)
	var delay atomic.Int64
	slow := delayAnswers(t, strings.TrimPrefix(etcd.Endpoint(), "https://"), &delay)
	j := fastJanitor
	j.ProbeTimeout, j.ProbeFailures = 5*time.Second, 1000
	r := startReplicaWith(t, Options{EtcdEndpoints: []string{"https://" + slow}, WriteTimeout: 5 * time.Second,
		ClaimTimeout: 5 * time.Second, Janitor: j, ClaimRate: -1})
	createTargets(t, r, target(t, "us-a", "us"))
	setPolicy(t, r, func(p *pb.Policy) { p.MinOccurrences = 1 })
	grant(t, r, key(0), []string{"us-a"}, "us") // the claims' shared lease exists
	place := func(ctx context.Context, k string) (*pb.PlaceResponse, error) {
		return r.place.Place(ctx, &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: []string{"us-a"},
			AgentRegion: "us", AgentId: "a1"})
	}
	delay.Store(int64(300 * time.Millisecond))
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	if resp, err := place(ctx, key(1)); err == nil {
		t.Fatalf("the cancelled Place was answered: %v", resp)
	}
	resp, err := place(context.Background(), key(2))
	if err != nil || resp.Fill == nil {
		t.Fatalf("a Place after a cancelled one: %v %v", resp, err)
	}
	delay.Store(0)
	eventually(t, 10*time.Second, "the cancelled call's claim released", func() bool {
		_, held := r.srv.w.Snapshot().Claim(key(1))
		return !held && metric(t, r, "detour_fill_reports_total", `outcome="cancelled"`) == 1
	})
}
