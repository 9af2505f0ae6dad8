package controlplane

import (
	"log/slog"
	"runtime"
	"runtime/debug"
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
