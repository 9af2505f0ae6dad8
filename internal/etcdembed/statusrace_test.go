package etcdembed

import (
	"context"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Status and Compact calls in flight while a member crashes or closes get an error, never a crash
// of the process: etcd 3.7.3 answers Status from its backend, and commits it after a Compact,
// without holding off the backend's close (etcd issue 22189), which killed test binaries whose
// replicas poll every member's Status, and one whose janitor compacted as its etcd closed.
func TestStatusWhileTheMemberStopsIsAnError(t *testing.T) {
	for round := range 6 {
		s, err := Start(context.Background(), Config{Dir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		cli, err := clientv3.New(s.ClientConfig())
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil {
					sctx, c := context.WithTimeout(ctx, 200*time.Millisecond)
					_, _ = cli.Status(sctx, s.Endpoint())
					c()
				}
			}()
		}
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil {
					cctx, c := context.WithTimeout(ctx, 200*time.Millisecond)
					if r, err := cli.Put(cctx, "k", "v"); err == nil {
						_, _ = cli.Compact(cctx, r.Header.Revision)
					}
					c()
				}
			}()
		}
		time.Sleep(50 * time.Millisecond)
		if round%2 == 0 {
			s.Crash()
		}
		s.Close()
		time.Sleep(100 * time.Millisecond)
		cancel()
		wg.Wait()
		cli.Close()
	}
}
