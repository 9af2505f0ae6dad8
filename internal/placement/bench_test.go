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
	})
}

// BenchmarkDecide measures an index lookup plus Decide, half hits and half misses, with every
// target accepted by the client (what a real client does with the advertised set).
func BenchmarkDecide(b *testing.B) {
	benchState()
	for _, n := range []int{10, 100, 1000} {
		b.Run(fmt.Sprintf("targets=%d", n), func(b *testing.B) {
			targets := map[string]Target{}
			var acc []string
			for i := range n {
				name := fmt.Sprintf("t%d", i)
				targets[name] = Target{Name: name, Region: []string{"us", "eu"}[i%2], Weight: uint32(1 + i%3), Healthy: true}
				acc = append(acc, name)
			}
			pol := Policy{MinRedirectBytes: 1024, RegionPreference: []string{"eu"}}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				key := benchKeys[i%benchObjects]
				if i%2 == 1 {
					key = key[:63] + "z" // a miss
				}
				Decide(targets, benchIndex[key], pol, Request{Key: key, Accepted: acc, Region: "us", Now: now})
			}
		})
	}
}
