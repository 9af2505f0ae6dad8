package targets

import (
	"bytes"
	"slices"
)

// shardCount trades the cost of one watch event (a copy of one shard, 1/shardCount of the index)
// against per-snapshot overhead (an array of shardCount shards).
const shardCount = 4096

// index maps content keys to their copies. A published index is never modified: an update copies
// only the shards it touches, so a watch event costs a 1/shardCount share of the index.
//
// Each shard is two sorted arrays rather than a map: a replica holds millions of copies, and a map
// would cost each one a half-empty slot and a separate slice of copies (369 bytes a copy, against
// the 136 of a key and an Object side by side).
type index struct {
	shards [shardCount]*shard // nil: empty
	count  int
}

// shard holds its copies in key order, a key's copies next to each other: keys[i] is the key of
// objs[i].
type shard struct {
	keys []Key
	objs []Object
}

// shardOf folds every byte of the key, so that keys that share a prefix (they should not, being
// hashes, but an agent sends them) still spread over all shards.
func shardOf(k Key) int {
	var x uint16
	for i := 0; i < len(k); i += 2 {
		x ^= uint16(k[i])<<8 | uint16(k[i+1])
	}
	return int(x % shardCount)
}

func compareKeys(a, b Key) int { return bytes.Compare(a[:], b[:]) }

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
	s := ix.shards[shardOf(k)]
	if s == nil {
		return nil
	}
	i, j := s.find(k)
	return s.objs[i:j:j]
}

// indexBuilder collects changes to an index and produces a new one.
type indexBuilder struct {
	base *index
	next *index
	// changed holds, for each shard touched, the new copies of every key changed (empty: none
	// left). build merges them into copies of those shards only.
	changed map[int]map[Key][]Object
}

func newIndexBuilder(base *index) *indexBuilder {
	n := *base
	return &indexBuilder{base: base, next: &n, changed: map[int]map[Key][]Object{}}
}

// copies returns k's copies as changed so far, and the shard's changes.
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

func (b *indexBuilder) put(k Key, o Object) {
	old, m := b.copies(k)
	copies := make([]Object, 0, len(old)+1)
	for _, c := range old {
		if c.Home.Target != o.Home.Target {
			copies = append(copies, c)
		}
	}
	b.next.count += len(copies) + 1 - len(old)
	m[k] = append(copies, o)
}

func (b *indexBuilder) remove(k Key, target string) {
	old, m := b.copies(k)
	copies := make([]Object, 0, len(old))
	for _, c := range old {
		if c.Home.Target != target {
			copies = append(copies, c)
		}
	}
	b.next.count -= len(old) - len(copies)
	m[k] = copies
}

// build merges the changes into new copies of the shards they touch.
func (b *indexBuilder) build() *index {
	for s, m := range b.changed {
		b.next.shards[s] = merge(b.base.shards[s], m)
		delete(b.changed, s) // a load's changes are the whole index: let them go shard by shard
	}
	return b.next
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
	if n == 0 {
		return nil
	}
	return &out
}
