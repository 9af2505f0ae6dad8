package controlplane

import (
	"math"
	"runtime/debug"
	"testing"
)

// A listing lowers the soft memory limit to what the runtime holds plus the headroom, overlapping
// listings share it, and the limit set before comes back when the last one ends; a lower limit
// already set (a container's) is kept. Not parallel: the limit is the process's.
func TestListingsBoundMemoryAndRestoreTheLimit(t *testing.T) {
	before := debug.SetMemoryLimit(-1)
	defer debug.SetMemoryLimit(before)
	debug.SetMemoryLimit(math.MaxInt64)
	var during, nested int64
	boundedListing(func() {
		during = debug.SetMemoryLimit(-1)
		boundedListing(func() { nested = debug.SetMemoryLimit(-1) })
		if got := debug.SetMemoryLimit(-1); got != during {
			t.Errorf("the limit after an overlapping listing ended: %d, want %d while the first runs", got, during)
		}
	})
	if during == math.MaxInt64 || during < listingHeadroom(0) || nested != during {
		t.Fatalf("limit during a listing %d, during an overlapping one %d", during, nested)
	}
	if got := debug.SetMemoryLimit(-1); got != math.MaxInt64 {
		t.Fatalf("the limit after the listings: %d, want the one before (none)", got)
	}

	const low = 64 << 20 // below what any process holds plus the headroom
	debug.SetMemoryLimit(low)
	boundedListing(func() {
		if got := debug.SetMemoryLimit(-1); got != low {
			t.Errorf("a listing raised a lower limit to %d", got)
		}
	})
	if got := debug.SetMemoryLimit(-1); got != low {
		t.Fatalf("the limit after a listing under a lower one: %d", got)
	}
}
