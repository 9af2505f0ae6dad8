package placement

import (
	"fmt"
	"sync"
	"testing"
)

const benchObjects = 1_000_000

var (
	benchOnce  sync.Once
	benchIndex map[string][]Copy
	benchKeys  []string
	// benchMisses are keys the index does not hold, made in advance: a miss key made per
	// operation would be garbage whose collections scan the whole index, and measure that instead.
	benchMisses []string
)

// benchState builds an index of 1e6 keys, each READY at one of 1000 targets, once for all sizes.
func benchState() {
	benchOnce.Do(func() {
		benchIndex = make(map[string][]Copy, benchObjects)
		benchKeys = make([]string, benchObjects)
		for i := range benchObjects {
			k := fmt.Sprintf("%064x", i*2654435761)
			benchKeys[i] = k
			benchIndex[k] = []Copy{{Target: fmt.Sprintf("t%d", i%1000), Size: 1 << 20}}
		}
		benchMisses = make([]string, 1<<16)
		for i := range benchMisses {
			benchMisses[i] = benchKeys[i][:63] + "z"
		}
	})
}

// BenchmarkDecide measures an index lookup plus Decide, half hits and half misses, with every
// target accepted by the client (what a real client does with the advertised set): "fleet" is a
// Fleet built once, as the control plane does per snapshot; "before" is the algorithm Fleet
// replaced (reference_test.go), measured in the same run for comparison; "lookup-only" is the
// index lookup without a decision.
func BenchmarkDecide(b *testing.B) {
	benchState()
	for _, n := range []int{10, 100, 1000} {
		targets := map[string]Target{}
		var acc []string
		for i := range n {
			name := fmt.Sprintf("t%d", i)
			targets[name] = Target{Name: name, Region: []string{"us", "eu"}[i%2], Weight: uint32(1 + i%3), Healthy: true}
			acc = append(acc, name)
		}
		pol := Policy{MinRedirectBytes: 1024, RegionPreference: []string{"eu"}}
		fleet := NewFleet(targets, pol)
		for _, impl := range []struct {
			name   string
			decide func(copies []Copy, req Request) Decision
		}{
			{"fleet", fleet.Decide},
			{"before", func(copies []Copy, req Request) Decision { return refDecide(targets, copies, pol, req) }},
			// The index lookup alone, the part of the others that is not Decide.
			{"lookup-only", func([]Copy, Request) Decision { return Decision{} }},
		} {
			b.Run(fmt.Sprintf("targets=%d/%s", n, impl.name), func(b *testing.B) {
				b.ReportAllocs()
				for i := 0; b.Loop(); i++ {
					key := benchKeys[i%benchObjects]
					if i%2 == 1 {
						key = benchMisses[i%len(benchMisses)]
					}
					// A fresh copy of the list, as a decoded request would carry.
					impl.decide(benchIndex[key], Request{Key: key, Accepted: acc, Region: "us", Now: now})
				}
			})
		}
	}
}
