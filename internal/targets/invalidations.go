package targets

import "sync"

// Invalidation is an object record (key's copy at target) removed or replaced at Revision:
// anything that cached a redirect to it must stop using it.
type Invalidation struct {
	Revision int64
	Key      Key
	Target   string
}

// invalidationLog keeps the most recent invalidations in a ring, so that streams to agents can
// send what changed since the revision they last sent. A stream that falls further behind than
// the ring holds is told to drop everything instead.
type invalidationLog struct {
	mu    sync.Mutex
	ring  []Invalidation
	next  int   // where the next entry goes
	full  bool  // the ring has wrapped
	floor int64 // entries at revisions <= floor may have been overwritten
}

func newInvalidationLog(size int) *invalidationLog {
	return &invalidationLog{ring: make([]Invalidation, size)}
}

func (l *invalidationLog) add(xs []Invalidation) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, x := range xs {
		if l.full {
			l.floor = l.ring[l.next].Revision
		}
		l.ring[l.next] = x
		l.next++
		if l.next == len(l.ring) {
			l.next, l.full = 0, true
		}
	}
}

// reset forgets everything up to rev: after a full reload the changes before it are unknown.
func (l *invalidationLog) reset(rev int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.next, l.full, l.floor = 0, false, rev
}

// since returns the invalidations after rev, oldest first, and false if some of them are no
// longer held.
func (l *invalidationLog) since(rev int64) ([]Invalidation, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if rev < l.floor {
		return nil, false
	}
	var out []Invalidation
	n := len(l.ring)
	start := 0
	if l.full {
		start = l.next
	} else {
		n = l.next
	}
	for i := 0; i < n; i++ {
		x := l.ring[(start+i)%len(l.ring)]
		if x.Revision > rev {
			out = append(out, x)
		}
	}
	return out, true
}

// InvalidationsSince returns the object records removed or replaced after revision rev, oldest
// first; false means the watcher no longer holds all of them (the caller should drop everything
// it cached).
func (w *Watcher) InvalidationsSince(rev int64) ([]Invalidation, bool) {
	return w.invalidations.since(rev)
}
