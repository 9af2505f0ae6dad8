package targets

import (
	"sync"
	"sync/atomic"
)

// homeID names an interned Home.
type homeID uint32

// homes interns every Home the process has indexed a copy at. Objects name their home by number,
// so that the index holds no pointers; a home is never forgotten (there are as many as targets
// times the stores and prefixes each has had, not as many as objects).
var homes homeTable

type homeTable struct {
	mu   sync.Mutex
	ids  map[Home]homeID
	list atomic.Pointer[[]*Home] // by id; replaced, never modified, when one is added
}

// get returns home id (which intern returned).
func (t *homeTable) get(id homeID) *Home { return (*t.list.Load())[id] }

// intern returns the id of h, adding it if it is new.
func (t *homeTable) intern(h Home) homeID {
	t.mu.Lock()
	defer t.mu.Unlock()
	if id, ok := t.ids[h]; ok {
		return id
	}
	var list []*Home
	if p := t.list.Load(); p != nil {
		list = *p
	}
	if t.ids == nil {
		t.ids = map[Home]homeID{}
	}
	id := homeID(len(list))
	next := append(list[:len(list):len(list)], &h)
	t.list.Store(&next)
	t.ids[h] = id
	return id
}
