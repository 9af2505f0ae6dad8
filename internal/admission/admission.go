// Package admission counts how often keys are asked for, approximately and in bounded memory, so
// that a control plane can grant a fill only to a key asked for more than once. It keeps counts in
// memory only: it writes nothing and decides nothing.
package admission

import (
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"
)

const (
	depth = 4
	width = 1 << 19 // counters per row, a power of two: depth·width bytes (2 MiB) per generation
	// Max is the largest count a sketch reports: counters are bytes.
	Max = 255
)

// table is one generation of a count-min sketch with conservative update: depth rows of 8-bit
// counters (four to a word), a key counted in one counter of each row. A key's count is the
// smallest of its counters, which other keys can only have raised: it may be over, never under.
type table [depth][width / 4]atomic.Uint32

// Sketch counts occurrences of keys within a sliding span of one to two windows: counts go to the
// current generation, and every window the current becomes the previous and the previous is
// dropped. Memory is fixed (4 MiB) whatever the number of keys; past about 500 000 distinct keys
// per window, counts of new keys start to come out high. Safe for concurrent use; counting takes
// no lock.
type Sketch struct {
	seed maphash.Seed

	mu      sync.Mutex // serialises rotations
	cur     atomic.Pointer[table]
	prev    atomic.Pointer[table]
	rotated atomic.Int64 // unix ns of the last rotation
}

// New returns an empty sketch whose first window starts at now.
func New(now time.Time) *Sketch {
	s := &Sketch{seed: maphash.MakeSeed()}
	s.cur.Store(new(table))
	s.prev.Store(new(table))
	s.rotated.Store(now.UnixNano())
	return s
}

// Observe counts one occurrence of key at now and returns how many times key occurred within the
// last one to two windows, this one included (possibly more, never fewer, at most Max).
func (s *Sketch) Observe(key string, now time.Time, window time.Duration) uint32 {
	s.rotate(now, window)
	h := maphash.String(s.seed, key)
	h1, h2 := uint32(h), uint32(h>>32)|1 // double hashing: row i uses h1 + i·h2
	cur, prev := s.cur.Load(), s.prev.Load()
	var at [depth]uint32
	c, p := uint32(Max), uint32(Max)
	for i := range depth {
		at[i] = (h1 + uint32(i)*h2) & (width - 1)
		c = min(c, get(&cur[i][at[i]/4], at[i]))
		p = min(p, get(&prev[i][at[i]/4], at[i]))
	}
	if c == Max {
		return Max
	}
	// Conservative update: raise only the counters at the key's count. The others already count
	// the key and some other keys; raising them would only overcount those.
	for i := range depth {
		w, shift := &cur[i][at[i]/4], (at[i]%4)*8
		for {
			old := w.Load()
			if (old>>shift)&0xff != c || w.CompareAndSwap(old, old+1<<shift) {
				break // raised, or another caller raised it: then it counts us too
			}
		}
	}
	return min(c+1+p, Max)
}

// Peek returns how many times key occurred within the last one to two windows, as Observe would
// count them before counting one more, without counting.
func (s *Sketch) Peek(key string, now time.Time, window time.Duration) uint32 {
	h := maphash.String(s.seed, key)
	h1, h2 := uint32(h), uint32(h>>32)|1
	cur, prev := s.cur.Load(), s.prev.Load()
	age := now.UnixNano() - s.rotated.Load()
	if age >= 2*int64(window) {
		return 0 // the next Observe drops both generations
	}
	c, p := uint32(Max), uint32(Max)
	for i := range depth {
		at := (h1 + uint32(i)*h2) & (width - 1)
		c = min(c, get(&cur[i][at/4], at))
		p = min(p, get(&prev[i][at/4], at))
	}
	if age >= int64(window) {
		return c // the next Observe makes the current generation the previous one
	}
	return min(c+p, Max)
}

func get(w *atomic.Uint32, j uint32) uint32 { return (w.Load() >> ((j % 4) * 8)) & 0xff }

func (s *Sketch) rotate(now time.Time, window time.Duration) {
	if now.UnixNano()-s.rotated.Load() < int64(window) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch age := now.UnixNano() - s.rotated.Load(); {
	case age < int64(window):
		return // another caller rotated
	case age < 2*int64(window):
		s.prev.Store(s.cur.Load())
	default:
		// Nothing counted in the current generation is within a window any more.
		s.prev.Store(new(table))
	}
	s.cur.Store(new(table))
	s.rotated.Store(now.UnixNano())
}
