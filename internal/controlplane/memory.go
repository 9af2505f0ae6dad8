package controlplane

import (
	"log/slog"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"time"
)

// releaseMemory collects garbage and returns the freed memory to the system at once. It is called
// after the phases that leave a heap's worth of garbage behind once (the first load, the first
// confirmation of every target's records): the collector would otherwise keep that memory for
// minutes, and a replica's resident memory at a million records would be half again its live heap.
func releaseMemory(log *slog.Logger, after string) {
	began := time.Now()
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	log.Debug("memory returned to the system", "after", after, "heap_in_use", ms.HeapInuse, "heap_released", ms.HeapReleased,
		"took", time.Since(began).Round(time.Millisecond).String())
}

// workHeadroom is how far the Go runtime's memory may grow, while work that makes a heap's worth of
// garbage runs (boundedWork), above what it would hold with its heap at the live size: an eighth
// of the live heap, and at least 64 MiB. A listing of buckets keeps what it lists of a target until
// it compares it (listedObjects: 40 bytes per object, four targets at a time; a target holding all
// of a 1e6 replica's records keeps 40 MB, within an eighth of its live heap) and makes about 120
// bytes of garbage per object listed (BenchmarkList). Without a bound the collector's own target
// lets the heap grow by half its live size meanwhile.
// The base is the live heap as of the last collection, not what the runtime holds: at a start the
// listing begins right after etcd's restart, whose garbage was still held, and a bound on top of
// that let the start's peak reach 1.06 KB of RSS per record at 1e6 (bench/RESULTS.md, "The
// start's listings, and etcd's first compaction").
func workHeadroom(live int64) int64 { return max(64<<20, live/8) }

// memoryHeld is what the Go runtime would hold with its heap at its live size as of the last
// collection (what the memory limit counts, less the heap's garbage and free room), and that live
// size.
func memoryHeld() (held, live int64) {
	s := []metrics.Sample{{Name: "/memory/classes/total:bytes"}, {Name: "/memory/classes/heap/released:bytes"},
		{Name: "/memory/classes/heap/free:bytes"}, {Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/unused:bytes"}, {Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	v := func(i int) int64 { return int64(s[i].Value.Uint64()) }
	live = v(5)
	return v(0) - v(1) - v(2) - v(3) - v(4) + live, live
}

// bounded counts the boundedWork running (the store guard's listing rounds).
var bounded struct {
	mu   sync.Mutex
	n    int
	prev int64 // the soft limit before the first of them
}

// boundedWork runs fn, work that makes a heap's worth of garbage once (the listings of a start's
// confirmation, which follow etcd's restart), with Go's soft memory limit lowered to what the
// runtime would hold at its live heap when the first running work began plus workHeadroom (unless
// the limit set already is lower), and restores the limit once the last running work ends. The
// collector then runs more often meanwhile instead of letting the garbage grow the process; its
// share of the CPU is capped by the runtime (half), so the work slows down rather than stalls.
// Everything else slows down too: under Place traffic the collector then runs almost without a
// break, and Place's p99 tripled during reconcile rounds run this way (bench/RESULTS.md, "Place
// while a listing runs"). So it is kept for the start's confirmation, once per process, and not
// used for the janitor's recurring reconcile rounds and compactions.
func boundedWork(fn func()) {
	bounded.mu.Lock()
	if bounded.n == 0 {
		bounded.prev = debug.SetMemoryLimit(-1)
		held, live := memoryHeld()
		if limit := held + workHeadroom(live); limit < bounded.prev {
			debug.SetMemoryLimit(limit)
		}
	}
	bounded.n++
	bounded.mu.Unlock()
	defer func() {
		bounded.mu.Lock()
		if bounded.n--; bounded.n == 0 {
			debug.SetMemoryLimit(bounded.prev)
		}
		bounded.mu.Unlock()
	}()
	fn()
}

// collectEvery is how often collectingWhile collects.
var collectEvery = 3 * time.Second

// collectingWhile runs fn, recurring work that makes garbage steadily for seconds (a reconcile
// round, a compaction of the etcd member in this process), and collects every collectEvery while
// it runs. The collector's own target would let the heap grow by half its live size first (at
// 1e6 records, 160 MB over an idle replica's first compaction); a collection every few seconds
// keeps the growth to what the work makes in that time. Unlike boundedWork it does not keep the
// collector running: under Place traffic, which collects every few seconds anyway, it adds a few
// collections, not a continuous one.
func collectingWhile(fn func()) {
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(collectEvery)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				runtime.GC()
			}
		}
	}()
	defer func() { close(done); <-stopped }()
	fn()
}
