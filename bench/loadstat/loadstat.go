// Package loadstat runs a closed-loop load at a fixed concurrency for a fixed time and summarizes
// throughput and latency percentiles. The bench/ drivers share it.
package loadstat

import (
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// Result of one run.
type Result struct {
	Ops      int
	Errors   int
	Elapsed  time.Duration
	P50, P99 time.Duration
	Bytes    int64
}

// PerSecond is the throughput in operations per second.
func (r Result) PerSecond() float64 { return float64(r.Ops) / r.Elapsed.Seconds() }

// MBps is the byte throughput in MB/s (1e6 bytes).
func (r Result) MBps() float64 { return float64(r.Bytes) / 1e6 / r.Elapsed.Seconds() }

func (r Result) String() string {
	return fmt.Sprintf("%9.0f/s  p50 %8s  p99 %8s  errors %d", r.PerSecond(), r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), r.Errors)
}

// Run calls op from concurrency goroutines until d has passed (or maxOps operations, if > 0).
// op gets the worker's index and its own counter and returns the bytes it moved.
func Run(concurrency int, d time.Duration, maxOps int64, op func(worker, i int) (int64, error)) Result {
	deadline := time.Now().Add(d)
	return run(concurrency, func() bool { return time.Now().Before(deadline) }, maxOps, op)
}

// RunUntil calls op from concurrency goroutines until stop is closed: one run, whose percentiles
// are over every operation of it, however long it lasts.
func RunUntil(concurrency int, stop <-chan struct{}, op func(worker, i int) (int64, error)) Result {
	return run(concurrency, func() bool {
		select {
		case <-stop:
			return false
		default:
			return true
		}
	}, 0, op)
}

func run(concurrency int, more func() bool, maxOps int64, op func(worker, i int) (int64, error)) Result {
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		lat     []time.Duration
		errs    atomic.Int64
		bytes   atomic.Int64
		started atomic.Int64
	)
	start := time.Now()
	for w := range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]time.Duration, 0, 4096)
			for i := 0; more(); i++ {
				if maxOps > 0 && started.Add(1) > maxOps {
					break
				}
				t0 := time.Now()
				n, err := op(w, i)
				local = append(local, time.Since(t0))
				if err != nil {
					errs.Add(1)
				}
				bytes.Add(n)
			}
			mu.Lock()
			lat = append(lat, local...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	r := Result{Ops: len(lat), Errors: int(errs.Load()), Elapsed: elapsed, Bytes: bytes.Load()}
	if len(lat) > 0 {
		r.P50 = lat[len(lat)/2]
		r.P99 = lat[len(lat)*99/100]
	}
	return r
}
