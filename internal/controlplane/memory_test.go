package controlplane

import (
	"math"
	"runtime"
	"runtime/debug"
	"slices"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/targets"
)

// A listing lowers the soft memory limit to what the runtime holds plus the headroom, overlapping
// listings share it, and the limit set before comes back when the last one ends; a lower limit
// already set (a container's) is kept. Not parallel: the limit is the process's.
func TestBoundedWorkLowersTheLimitAndRestoresIt(t *testing.T) {
	before := debug.SetMemoryLimit(-1)
	defer debug.SetMemoryLimit(before)
	debug.SetMemoryLimit(math.MaxInt64)
	var during, nested int64
	boundedWork(func() {
		during = debug.SetMemoryLimit(-1)
		boundedWork(func() { nested = debug.SetMemoryLimit(-1) })
		if got := debug.SetMemoryLimit(-1); got != during {
			t.Errorf("the limit after an overlapping listing ended: %d, want %d while the first runs", got, during)
		}
	})
	if during == math.MaxInt64 || during < workHeadroom(0) || nested != during {
		t.Fatalf("limit during a listing %d, during an overlapping one %d", during, nested)
	}
	if got := debug.SetMemoryLimit(-1); got != math.MaxInt64 {
		t.Fatalf("the limit after the listings: %d, want the one before (none)", got)
	}

	const low = 64 << 20 // below what any process holds plus the headroom
	debug.SetMemoryLimit(low)
	boundedWork(func() {
		if got := debug.SetMemoryLimit(-1); got != low {
			t.Errorf("a listing raised a lower limit to %d", got)
		}
	})
	if got := debug.SetMemoryLimit(-1); got != low {
		t.Fatalf("the limit after a listing under a lower one: %d", got)
	}
}

// The bound is taken from the live heap, not from what the runtime holds: garbage not collected
// yet when a listing begins (a start's listing follows etcd's restart) does not raise it.
func TestWorkBoundIgnoresGarbageNotCollectedYet(t *testing.T) {
	before := debug.SetMemoryLimit(math.MaxInt64)
	defer debug.SetMemoryLimit(before)
	defer debug.SetGCPercent(debug.SetGCPercent(-1)) // no collection while the garbage is made
	runtime.GC()
	_, live := memoryHeld()
	const garbage = 512 << 20
	for range garbage >> 20 {
		sink = make([]byte, 1<<20)
	}
	sink = nil
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	if held := int64(ms.Sys - ms.HeapReleased); held < garbage {
		t.Fatalf("the runtime holds %d bytes: the garbage was collected, the test proves nothing", held)
	}
	var during int64
	boundedWork(func() { during = debug.SetMemoryLimit(-1) })
	if during > live+workHeadroom(live)+garbage/2 {
		t.Fatalf("limit during a listing %d MiB with %d MiB live: the garbage counted", during>>20, live>>20)
	}
}

var sink []byte

// A listing's objects are found by key whether the store listed them in key order or not, and a
// key not listed is not found.
func TestListedObjectsFindEachKey(t *testing.T) {
	key := func(i int) targets.Key {
		var k targets.Key
		k[0], k[31] = byte(i), byte(i*7)
		return k
	}
	for _, order := range [][]int{{1, 2, 3, 5, 8}, {8, 3, 5, 1, 2}} {
		l := newListedObjects(2) // fewer than listed: it grows
		for _, i := range order {
			l.add(key(i), int64(100+i))
		}
		for i := range 10 {
			gen, ok := l.generation(key(i))
			want := slices.Contains(order, i)
			if ok != want || (ok && gen != int64(100+i)) {
				t.Fatalf("order %v: key %d: generation %d, listed %v", order, i, gen, ok)
			}
		}
	}
}

// collectingWhile collects every collectEvery while its work runs, and not after it returns.
func TestCollectingWhileCollectsAsTheWorkRuns(t *testing.T) {
	defer func(d time.Duration) { collectEvery = d }(collectEvery)
	collectEvery = 20 * time.Millisecond
	var before, during, after runtime.MemStats
	runtime.ReadMemStats(&before)
	collectingWhile(func() { time.Sleep(300 * time.Millisecond) })
	runtime.ReadMemStats(&during)
	if n := during.NumForcedGC - before.NumForcedGC; n < 3 {
		t.Fatalf("%d collections during 300 ms of work, collecting every 20 ms", n)
	}
	time.Sleep(100 * time.Millisecond)
	runtime.ReadMemStats(&after)
	if n := after.NumForcedGC - during.NumForcedGC; n != 0 {
		t.Fatalf("%d collections after the work ended", n)
	}
}
