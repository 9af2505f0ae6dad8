package controlplane

import (
	"bytes"
	"slices"

	"github.com/detourhq/detour/internal/targets"
)

// listedObjects is what a listing of one prefix found: each key's generation, kept in key order
// for lookups. 40 bytes an object, where a map from key to generation held 100 (at a million
// objects, measured): a listing of a target holding all of a replica's records keeps it until the
// comparison with the index, within the listing's memory bound (workHeadroom).
type listedObjects struct {
	objs   []listedObject
	sorted bool
}

type listedObject struct {
	key targets.Key
	gen int64
}

// newListedObjects expects about n objects. A store lists names in byte order, which for Detour's
// names under one prefix is key order: adding them then keeps the list sorted at no cost.
func newListedObjects(n int) *listedObjects {
	return &listedObjects{objs: make([]listedObject, 0, n), sorted: true}
}

func (l *listedObjects) add(k targets.Key, gen int64) {
	if n := len(l.objs); n > 0 && bytes.Compare(l.objs[n-1].key[:], k[:]) >= 0 {
		l.sorted = false
	}
	l.objs = append(l.objs, listedObject{key: k, gen: gen})
}

// generation is k's generation as listed, and whether it was listed. Not safe for concurrent use
// with add: the first lookup after an out-of-order add sorts the list.
func (l *listedObjects) generation(k targets.Key) (int64, bool) {
	if !l.sorted {
		slices.SortStableFunc(l.objs, func(a, b listedObject) int { return bytes.Compare(a.key[:], b.key[:]) })
		l.sorted = true
	}
	i, ok := slices.BinarySearchFunc(l.objs, k, func(o listedObject, k targets.Key) int { return bytes.Compare(o.key[:], k[:]) })
	if !ok {
		return 0, false
	}
	return l.objs[i].gen, true
}
