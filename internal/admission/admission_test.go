package admission

import (
	"fmt"
	"testing"
	"time"
)

func TestObserveCountsEachKeyWithinTheWindow(t *testing.T) {
	t0 := time.Unix(1000, 0)
	const w = time.Minute
	for _, c := range []struct {
		name string
		at   []time.Duration // offsets from t0 of each occurrence of one key
		want uint32          // what the last occurrence returns
	}{
		{"first occurrence", []time.Duration{0}, 1},
		{"second within the window", []time.Duration{0, 30 * time.Second}, 2},
		{"third within the window", []time.Duration{0, time.Second, 2 * time.Second}, 3},
		{"second in the next window still counts", []time.Duration{50 * time.Second, 70 * time.Second}, 2},
		{"second two windows later is a first", []time.Duration{0, 2*w + time.Second}, 1},
		{"counts survive one rotation only", []time.Duration{0, w + time.Second, 3*w + 2*time.Second}, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := New(t0)
			var got uint32
			for _, d := range c.at {
				got = s.Observe("k", t0.Add(d), w)
			}
			if got != c.want {
				t.Errorf("count %d, want %d", got, c.want)
			}
		})
	}
}

func TestObserveRarelyCountsANewKeyTwice(t *testing.T) {
	// After 100 000 keys seen once each, a new key must look new:
	// seen twice, it would be admitted on its first miss.
	s, now := New(time.Unix(0, 0)), time.Unix(1, 0)
	const n = 100000
	for i := range n {
		s.Observe(fmt.Sprint("old-", i), now, time.Hour)
	}
	over := 0
	for i := range n {
		if s.Observe(fmt.Sprint("new-", i), now, time.Hour) > 1 {
			over++
		}
	}
	t.Logf("%d of %d new keys counted more than once", over, n)
	if over > n/100 {
		t.Errorf("%d of %d new keys counted more than once", over, n)
	}
}

func TestObserveSaturatesAtMax(t *testing.T) {
	s, now := New(time.Unix(0, 0)), time.Unix(1, 0)
	var got uint32
	for range Max + 10 {
		got = s.Observe("k", now, time.Hour)
	}
	if got != Max {
		t.Errorf("count %d, want %d", got, Max)
	}
}

func BenchmarkObserve(b *testing.B) {
	s, now := New(time.Unix(0, 0)), time.Unix(1, 0)
	keys := make([]string, 1024)
	for i := range keys {
		keys[i] = fmt.Sprintf("%064x", i)
	}
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			s.Observe(keys[i%len(keys)], now, time.Hour)
			i++
		}
	})
}

// Peek is what Observe would count before its own occurrence, across rotations, and counts nothing.
func TestPeekIsObserveWithoutCounting(t *testing.T) {
	t0 := time.Unix(1000, 0)
	const w = time.Minute
	s := New(t0)
	for i, d := range []time.Duration{0, time.Second, 50 * time.Second, 70 * time.Second, 100 * time.Second, 200 * time.Second, 330 * time.Second} {
		now := t0.Add(d)
		peek := s.Peek("k", now, w)
		if again := s.Peek("k", now, w); again != peek {
			t.Fatalf("occurrence %d: Peek changed the count: %d then %d", i, peek, again)
		}
		if got := s.Observe("k", now, w); got != peek+1 {
			t.Fatalf("occurrence %d at +%v: Peek %d, then Observe %d", i, d, peek, got)
		}
	}
	if n := s.Peek("other", t0.Add(330*time.Second), w); n != 0 {
		t.Fatalf("a key never seen: %d", n)
	}
}
