package e2e

import (
	"context"
	"os"
	"testing"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// BenchmarkClone measures a real hg clone of the test repository from the origin directly and
// through the agent, cold (nothing stored: inline while the store fills) and warm (redirects), all
// in one run on one machine. origin-MB/op is what hg serve sent (a counting proxy in front of it).
//
//	go test -run '^$' -bench Clone -benchtime 5x ./e2e
func BenchmarkClone(b *testing.B) {
	r := newRig(b, fullRepo)
	run := func(b *testing.B, url string, before func()) {
		var originBytes int64
		for i := 0; i < b.N; i++ {
			if before != nil {
				b.StopTimer()
				before()
				b.StartTimer()
			}
			start := r.originTap.responseBytes.Load()
			dir, _ := r.clone(url)
			b.StopTimer()
			originBytes += r.originTap.responseBytes.Load() - start
			_ = os.RemoveAll(dir)
			b.StartTimer()
		}
		b.ReportMetric(float64(originBytes)/1e6/float64(b.N), "origin-MB/op")
	}
	b.Run("origin", func(b *testing.B) { run(b, r.originTap.URL, nil) })
	b.Run("agent-cold", func(b *testing.B) { run(b, r.agentTap.URL, r.purge) })
	b.Run("agent-warm", func(b *testing.B) {
		r.clone(r.agentTap.URL)
		r.waitFills()
		run(b, r.agentTap.URL, nil)
	})
}

// purge removes every object from the index and waits for the fills of the last clone first, so
// that the next clone starts cold.
func (r *rig) purge() {
	ctx := context.Background()
	if r.agentMetric("detour_agent_requests_total", `outcome="inline_fill"`) > 0 {
		r.waitFills()
	}
	list, err := r.admin.ListObjects(ctx, &pb.ListObjectsRequest{PageSize: 1000})
	r.must(err)
	for _, o := range list.Objects {
		_, err := r.admin.DeleteObjects(ctx, &pb.DeleteObjectsRequest{Key: o.Key})
		r.must(err)
	}
}
