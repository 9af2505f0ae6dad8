package controlplane

import (
	"context"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/etcdembed"
	"github.com/detourhq/detour/internal/pki"
	"github.com/detourhq/detour/internal/placement"
	"github.com/detourhq/detour/internal/targets"
	"github.com/detourhq/detour/internal/testbed"
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

// slowClaimReplica is a replica whose etcd answers after *delay (a proxy), with one target us-a,
// every first miss claimed, and the claims' shared lease granted.
func slowClaimReplica(t *testing.T) (*etcdembed.Server, *atomic.Int64, *replica) {
	t.Helper()
	etcd := startEtcd(t)
	delay := new(atomic.Int64)
	slow := delayAnswers(t, strings.TrimPrefix(etcd.Endpoint(), "https://"), delay)
	j := fastJanitor
	j.ProbeTimeout, j.ProbeFailures = 5*time.Second, 1000 // probing is not these tests' subject
	r := startReplicaWith(t, Options{EtcdEndpoints: []string{"https://" + slow}, WriteTimeout: 5 * time.Second,
		ClaimTimeout: 5 * time.Second, Janitor: j, ClaimRate: -1})
	createTargets(t, r, target(t, "us-a", "us"))
	setPolicy(t, r, func(p *pb.Policy) { p.MinOccurrences = 1 })
	grant(t, r, key(0), []string{"us-a"}, "us")
	return etcd, delay, r
}

// A caller that cancels while its claim is being written (etcd answers slowly here, through a
// proxy) is answered cancelled: the claim etcd committed is released at once instead of blocking
// the key's fills for the claim TTL, and a Place right after it is granted its fill.
func TestCancelledClaimIsReleased(t *testing.T) {
	_, delay, r := slowClaimReplica(t)
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

// On an etcd that commits a claim more slowly than half an agent's Place deadline, fills are still
// granted: the claim's write goes on after the Place is answered claim_pending, and the grant is
// handed to the same agent's next Place of the key, without a second write. Another agent asking
// meanwhile is told the fill is in progress; a late grant its agent never comes back for is
// released after parkFor. (Before, the write was cut at half the caller's deadline: no claim was
// ever written and every request went to the origin.)
func TestClaimsSlowerThanThePlaceDeadlineAreHandedToTheNextPlace(t *testing.T) {
	etcd, delay, r := slowClaimReplica(t)
	other := pb.NewPlacementServiceClient(testbed.Dial(t, r.addr(), issue(t, pki.AgentPrefix+"other")))
	place := func(c pb.PlacementServiceClient, k string) *pb.PlaceResponse {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Millisecond) // patience: 30ms
		defer cancel()
		resp, err := c.Place(ctx, &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: []string{"us-a"},
			AgentRegion: "us", AgentId: "a1"})
		if err != nil {
			t.Fatalf("Place of %s: %v", k, err)
		}
		return resp
	}
	delay.Store(int64(time.Second)) // the four Places below each take at most 30ms
	for i, k := range []string{key(1), key(2)} {
		if resp := place(r.place, k); resp.Fill != nil || resp.Reason != ReasonClaimPending {
			t.Fatalf("Place %d during a slow claim: %v, want %s", i, resp, ReasonClaimPending)
		}
	}
	if resp := place(r.place, key(1)); resp.Fill != nil || resp.Reason != ReasonClaimPending {
		t.Fatalf("the same agent again while its claim is written: %v, want %s", resp, ReasonClaimPending)
	}
	if resp := place(other, key(1)); resp.Fill != nil || resp.Reason != string(placement.ReasonFillInProgress) {
		t.Fatalf("another agent while the claim is written: %v, want fill_in_progress", resp)
	}
	eventually(t, 5*time.Second, "both late claims parked", func() bool {
		return metric(t, r, "detour_fill_reports_total", `outcome="parked"`) == 2
	})
	if resp := place(other, key(1)); resp.Fill != nil {
		t.Fatalf("another agent was handed a parked claim: %v", resp)
	}
	got := place(r.place, key(1))
	if got.Fill == nil || got.Fill.Target != "us-a" || got.Fill.Ttl.AsDuration() <= 0 || got.Fill.Ttl.AsDuration() > targets.DefaultFillClaimTTL {
		t.Fatalf("the agent's next Place after its claim was written: %v, want the parked grant", got)
	}
	eventually(t, 5*time.Second, "the claim in the snapshot", func() bool {
		c, held := r.srv.w.Snapshot().Claim(key(1))
		return held && c.Token == got.Fill.Token
	})
	if n := metric(t, r, "detour_fill_reports_total", `outcome="parked_handed"`); n != 1 {
		t.Fatalf("parked claims handed: %v, want 1", n)
	}
	// key(2)'s agent never comes back: its claim is released after parkFor, and anyone may fill.
	delay.Store(0)
	eventually(t, parkFor+5*time.Second, "the unused parked claim released", func() bool {
		_, held := r.srv.w.Snapshot().Claim(key(2))
		return !held && metric(t, r, "detour_fill_reports_total", `outcome="parked_released"`) == 1
	})
	if resp := place(other, key(2)); resp.Fill == nil {
		t.Fatalf("another agent after the parked claim was released: %v", resp)
	}

	// A replica that stops releases the claims it had parked: left, each would hold its key's
	// fills for the claim's TTL.
	delay.Store(int64(500 * time.Millisecond))
	if resp := place(r.place, key(3)); resp.Reason != ReasonClaimPending {
		t.Fatalf("key 3: %v, want %s", resp, ReasonClaimPending)
	}
	eventually(t, 5*time.Second, "key 3's claim parked", func() bool {
		return metric(t, r, "detour_fill_reports_total", `outcome="parked"`) == 3
	})
	delay.Store(0)
	r.shutdown(t)
	cli, err := clientv3.New(etcd.ClientConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if got, err := cli.Get(context.Background(), testPrefix(t)+"fills/"+key(3)); err != nil || len(got.Kvs) != 0 {
		t.Fatalf("key 3's parked claim outlived the replica that parked it: %v %v", got, err)
	}
	if got, err := cli.Get(context.Background(), testPrefix(t)+"fills/"+key(2)); err != nil || len(got.Kvs) != 1 {
		t.Fatalf("key 2's claim, granted to the other agent, must stay: %v %v", got, err)
	}
}
