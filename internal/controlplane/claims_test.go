package controlplane

import (
	"context"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Callers that cancel their Place while its fill claim is being written (clients that hang up, as
// seen through an agent) do not stop other callers' fills: only etcd's failures open the claim
// breaker. Every honest Place during the storm is granted its fill; the cancelled claims are
// released, not left to block their keys for the claim TTL, and are counted as cancelled.
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
		held    = map[string]bool{} // keys a cancelled caller was granted before it cancelled
		settled = 0                 // cancelled calls that got an answer anyway
	)
	for c := range cancellers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perCanceller {
				k := key(1000 + c*perCanceller + i)
				ctx, cancel := context.WithCancel(context.Background())
				time.AfterFunc(time.Duration(rand.IntN(3000))*time.Microsecond, cancel)
				resp, err := place(ctx, k)
				cancel()
				if err == nil {
					mu.Lock()
					settled++
					if resp.Fill != nil {
						held[k] = true
					}
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
	// The claims of the cancelled calls are released at once (the TTL is 30s by default).
	eventually(t, 5*time.Second, "the cancelled calls' claims released", func() bool {
		snap := r.srv.w.Snapshot()
		for c := range cancellers * perCanceller {
			k := key(1000 + c)
			if _, ok := snap.Claim(k); ok && !held[k] {
				return false
			}
		}
		return true
	})
	t.Logf("%d cancelled Places (%d answered before the cancel, %.0f counted cancelled); %d honest Places all granted",
		cancellers*perCanceller, settled, cancelled, honest)
}
