package targets

import (
	"bytes"
	"slices"
	"strings"
)

// The index maps content keys to their copies. A published index is never modified: an update
// copies only the leaves it touches and the nodes above them, so a watch event costs a few
// kilobytes whatever the size of the index.
//
// Keys are spread over 65 536 leaves by a fold of every byte of the key, under 256 nodes of 256
// leaves each. A leaf is two sorted arrays rather than a map: a replica holds millions of copies,
// and a map would cost each one a half-empty slot and a separate slice of copies (369 bytes a
// copy, against the 136 of a key and an Object side by side). Objects hold no pointers, so the
// garbage collector never scans the arrays.
const (
	fanout    = 256
	leafCount = fanout * fanout
)

type index struct {
	nodes [fanout]*node // nil: empty
	count int
}

type node struct {
	leaves [fanout]*shard // nil: empty
}

// shard holds its copies in key order, a key's copies next to each other in target order: keys[i]
// is the key of objs[i].
type shard struct {
	keys []Key
	objs []Object
}

// shardOf folds every byte of the key, so that keys that share a prefix (they should not, being
// hashes, but an agent sends them) still spread over all leaves.
func shardOf(k Key) int {
	var x uint16
	for i := 0; i < len(k); i += 2 {
		x ^= uint16(k[i])<<8 | uint16(k[i+1])
	}
	return int(x)
}

func compareKeys(a, b Key) int { return bytes.Compare(a[:], b[:]) }

// leaf returns leaf s, nil if empty.
func (ix *index) leaf(s int) *shard {
	n := ix.nodes[s/fanout]
	if n == nil {
		return nil
	}
	return n.leaves[s%fanout]
}

// find is where k's copies start (or would), and where they end.
func (s *shard) find(k Key) (int, int) {
	if s == nil {
		return 0, 0
	}
	i, found := slices.BinarySearchFunc(s.keys, k, compareKeys)
	if !found {
		return i, i
	}
	return i, s.end(i)
}

// end is the end of the run of copies of the key at i.
func (s *shard) end(i int) int {
	j := i + 1
	for j < len(s.keys) && s.keys[j] == s.keys[i] {
		j++
	}
	return j
}

// get returns k's copies; the capacity is cut so that appending to them cannot reach a neighbour's.
func (ix *index) get(k Key) []Object {
	s := ix.leaf(shardOf(k))
	if s == nil {
		return nil
	}
	i, j := s.find(k)
	return s.objs[i:j:j]
}

// each calls fn with every leaf until it returns false.
func (ix *index) each(fn func(*shard) bool) {
	for _, n := range ix.nodes {
		if n == nil {
			continue
		}
		for _, s := range n.leaves {
			if s != nil && !fn(s) {
				return
			}
		}
	}
}

// indexBuilder collects changes to an index and produces a new one.
type indexBuilder struct {
	base *index
	// changed holds, for each leaf touched, the new copies of every key changed (empty: none
	// left). build merges them into copies of those leaves only.
	changed map[int]map[Key][]Object
	count   int
}

func newIndexBuilder(base *index) *indexBuilder {
	return &indexBuilder{base: base, changed: map[int]map[Key][]Object{}, count: base.count}
}

// copies returns k's copies as changed so far, and the leaf's changes.
func (b *indexBuilder) copies(k Key) ([]Object, map[Key][]Object) {
	s := shardOf(k)
	m := b.changed[s]
	if m == nil {
		m = map[Key][]Object{}
		b.changed[s] = m
	}
	if c, ok := m[k]; ok {
		return c, m
	}
	return b.base.get(k), m
}

// put records o as k's copy at o's target, replacing any copy there.
func (b *indexBuilder) put(k Key, o Object) {
	old, m := b.copies(k)
	copies := make([]Object, 0, len(old)+1)
	target := o.Target()
	for _, c := range old {
		if c.Target() != target {
			copies = append(copies, c)
		}
	}
	// Copies stay in target order, as a load leaves them.
	i, _ := slices.BinarySearchFunc(copies, target, func(c Object, t string) int { return strings.Compare(c.Target(), t) })
	b.count += len(copies) + 1 - len(old)
	m[k] = slices.Insert(copies, i, o)
}

func (b *indexBuilder) remove(k Key, target string) {
	old, m := b.copies(k)
	copies := make([]Object, 0, len(old))
	for _, c := range old {
		if c.Target() != target {
			copies = append(copies, c)
		}
	}
	b.count -= len(old) - len(copies)
	m[k] = copies
}

// build merges the changes into new copies of the leaves they touch and of their nodes.
func (b *indexBuilder) build() *index {
	next := &index{nodes: b.base.nodes, count: b.count}
	copied := [fanout]bool{}
	for s, m := range b.changed {
		n := s / fanout
		if !copied[n] {
			c := &node{}
			if old := next.nodes[n]; old != nil {
				*c = *old
			}
			next.nodes[n], copied[n] = c, true
		}
		next.nodes[n].leaves[s%fanout] = merge(b.base.leaf(s), m)
	}
	b.changed = nil
	return next
}

// merge returns base with the copies of the keys in changed replaced, in arrays of exactly the
// size needed.
func merge(base *shard, changed map[Key][]Object) *shard {
	if base == nil {
		base = &shard{}
	}
	keys := make([]Key, 0, len(changed))
	n := len(base.objs)
	for k, c := range changed {
		keys = append(keys, k)
		i, j := base.find(k)
		n += len(c) - (j - i)
	}
	if n == 0 {
		return nil
	}
	slices.SortFunc(keys, compareKeys)
	out := shard{keys: make([]Key, 0, n), objs: make([]Object, 0, n)}
	i := 0
	for _, k := range keys {
		start, end := base.find(k)
		out.keys = append(out.keys, base.keys[i:start]...)
		out.objs = append(out.objs, base.objs[i:start]...)
		for _, c := range changed[k] {
			out.keys = append(out.keys, k)
			out.objs = append(out.objs, c)
		}
		i = end
	}
	out.keys = append(out.keys, base.keys[i:]...)
	out.objs = append(out.objs, base.objs[i:]...)
	return &out
}
