package controlplane

import (
	"log/slog"
	"runtime"
	"runtime/debug"
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

// listingHeadroom is how far the Go runtime's memory may grow, while a listing of buckets runs,
// above what it held when the listing began: a quarter of that, and at least 128 MiB. A listing
// decodes an object's worth of garbage per stored object (a million at a time for a start's
// confirmation or a reconcile round), and the collector's own target would let the heap grow by
// half its live size meanwhile: 1.13–1.26 KB per record of RSS at 1e6 for seconds, against
// 0.85 KB between listings. A listing also keeps what it lists of a target (about 64 bytes per
// object) until it is compared: a quarter of a process's memory at about 0.5 KB per record covers
// a target holding every record, so that the bound does not keep the collector running.
func listingHeadroom(held int64) int64 { return max(128<<20, held/4) }

// listings bounds memory while any listing runs (they may overlap: the store guard's and the
// janitor's).
var listings struct {
	mu   sync.Mutex
	n    int
	prev int64 // the soft limit before the first of them
}

// boundedListing runs fn, a listing of buckets, with Go's soft memory limit lowered to what the
// runtime held when the first running listing began plus its listingHeadroom (unless the limit set
// already is lower), and restores the limit once the last running listing ends. The collector
// then runs more often during the listing instead of letting its garbage grow the process; its
// share of the CPU is capped by the runtime (half), so a listing slows down rather than stalls.
func boundedListing(fn func()) {
	listings.mu.Lock()
	if listings.n == 0 {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		listings.prev = debug.SetMemoryLimit(-1)
		held := int64(ms.Sys - ms.HeapReleased)
		if limit := held + listingHeadroom(held); limit < listings.prev {
			debug.SetMemoryLimit(limit)
		}
	}
	listings.n++
	listings.mu.Unlock()
	defer func() {
		listings.mu.Lock()
		if listings.n--; listings.n == 0 {
			debug.SetMemoryLimit(listings.prev)
		}
		listings.mu.Unlock()
	}()
	fn()
}
