package placement

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"time"
)

// TestFleetAnswersAsBeforeIndexing compares the indexed path with the algorithm it replaced
// (reference_test.go) on random fleets, policies, copies and requests, reusing each Fleet for many
// requests so that remembered accepted lists are exercised too.
func TestFleetAnswersAsBeforeIndexing(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	regions := []string{"us", "eu", "ap", ""}
	pick := func(xs []string) string { return xs[rng.IntN(len(xs))] }
	for fleetN := range 300 {
		pool := []string{"zz-unknown"}
		targets := map[string]Target{}
		for i := range rng.IntN(40) {
			name := fmt.Sprintf("%s-%d", pick(regions[:3]), i*7%23)
			pool = append(pool, name)
			targets[name] = Target{Name: name, Region: pick(regions), Weight: uint32(rng.IntN(4)),
				State: State(rng.IntN(3)), Healthy: rng.IntN(5) != 0}
		}
		var pol Policy
		for range rng.IntN(4) {
			pol.RegionPreference = append(pol.RegionPreference, pick(append(regions, "mars")))
		}
		pol.ForbidCrossRegionFills = rng.IntN(4) == 0
		pol.MinRedirectBytes = uint64(rng.IntN(3)) * 100
		f := NewFleet(targets, pol)
		lists := make([][]string, 3)
		for i := range lists {
			for range rng.IntN(len(pool) + 2) {
				lists[i] = append(lists[i], pick(pool))
			}
		}
		for reqN := range 200 {
			var copies []Copy
			for range rng.IntN(4) {
				c := Copy{Target: pick(pool), Size: uint64(rng.IntN(300))}
				if rng.IntN(4) == 0 {
					c.Expires = now.Add(time.Duration(rng.IntN(3)-1) * time.Second)
				}
				copies = append(copies, c)
			}
			req := Request{Key: fmt.Sprintf("%064x", rng.Uint64()), Accepted: lists[rng.IntN(len(lists))],
				Region: pick(append(regions, "mars")), SizeHint: uint64(rng.IntN(3)) * 80, Now: now}
			if got, want := f.Decide(copies, req), refDecide(targets, copies, pol, req); got != want {
				t.Fatalf("fleet %d request %d: Decide = %+v, before indexing %+v\ntargets %v\npolicy %+v\ncopies %v\nrequest %+v",
					fleetN, reqN, got, want, targets, pol, copies, req)
			}
			if got, want := f.Home(req.Key, req.Region), refHome(targets, pol, req.Key, req.Region); got != want {
				t.Fatalf("fleet %d request %d: Home = %q, before indexing %q", fleetN, reqN, got, want)
			}
			if got, want := f.InRegion(req.Key, req.Region), refInRegion(targets, req.Key, req.Region); got != want {
				t.Fatalf("fleet %d request %d: InRegion = %q, before indexing %q", fleetN, reqN, got, want)
			}
			if name := pick(pool); Score(req.Key, name, 3) != refScore(req.Key, name, 3) {
				t.Fatalf("Score(%q, %q) changed", req.Key, name)
			}
		}
	}
}

// TestCannotBeatOnlyRulesOutLosers checks the bound that lets a decision skip the logarithm: a
// target it rules out scores strictly less than the best so far.
func TestCannotBeatOnlyRulesOutLosers(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for range 2_000_000 {
		w := uint32(rng.IntN(1000) + 1)
		u := uniform(rng.Uint64())
		if rng.IntN(2) == 0 {
			u = uniform(^uint64(0) - rng.Uint64N(1<<20)) // near 1, where the bound is tight
		}
		s := float64(w) / -math.Log(u)
		for _, best := range []float64{s, s * (1 + 1e-12), s * 1.01, s * 2, float64(w) / -math.Log(uniform(rng.Uint64()))} {
			if cannotBeat(w, u, best) && s >= best {
				t.Fatalf("cannotBeat(%d, %v, %v), but the score is %v", w, u, best, s)
			}
		}
	}
}
