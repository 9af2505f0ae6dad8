package targets

import (
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// TestIndexMatchesAMapOfCopies applies random puts and removes, a few builders in a row, to the
// index and to a plain map of each key's copies, and checks that they agree and that building a new
// index leaves the one it started from as it was (a published snapshot is never modified).
func TestIndexMatchesAMapOfCopies(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(5, 6))
	// Keys crowded into three leaves, so that shards hold many keys with several copies each.
	var keys []Key
	for len(keys) < 200 {
		var k Key
		for i := range k {
			k[i] = byte(rng.IntN(256))
		}
		if len(keys) >= 20 {
			// Fix the last two bytes so that the key lands in leaf 0, 1 or 2.
			k[30], k[31] = 0, 0
			x := uint16(shardOf(k)) ^ uint16(rng.IntN(3))
			k[30], k[31] = byte(x>>8), byte(x)
		}
		keys = append(keys, k)
	}
	ids := []homeID{homes.intern(Home{Target: "a"}), homes.intern(Home{Target: "b"}), homes.intern(Home{Target: "c"})}
	model := map[Key][]Object{}
	ix := &index{}
	for round := range 50 {
		before := contents(ix)
		b := newIndexBuilder(ix)
		for range rng.IntN(300) {
			k := keys[rng.IntN(len(keys))]
			h := ids[rng.IntN(len(ids))]
			var kept []Object
			for _, c := range model[k] {
				if c.home != h {
					kept = append(kept, c)
				}
			}
			if rng.IntN(3) == 0 {
				b.remove(k, homes.get(h).Target)
			} else {
				o := Object{home: h, Size: rng.Uint64()}
				b.put(k, o)
				kept = append(kept, o)
				// A key's copies are kept in target order.
				slices.SortFunc(kept, func(a, b Object) int { return strings.Compare(a.Target(), b.Target()) })
			}
			if len(kept) == 0 {
				delete(model, k)
			} else {
				model[k] = kept
			}
		}
		next := b.build()
		if got := contents(ix); !reflect.DeepEqual(got, before) {
			t.Fatalf("round %d: building changed the base index", round)
		}
		ix = next
		if got := contents(ix); !reflect.DeepEqual(got, model) {
			t.Fatalf("round %d: index holds\n%v\nwant\n%v", round, got, model)
		}
		n := 0
		for _, k := range keys {
			if got := ix.get(k); !reflect.DeepEqual(got, model[k]) && len(got)+len(model[k]) > 0 {
				t.Fatalf("round %d: get(%x) = %v, want %v", round, k, got, model[k])
			}
			n += len(model[k])
		}
		if ix.count != n {
			t.Fatalf("round %d: count %d, want %d", round, ix.count, n)
		}
	}
}

// contents is every key's copies, through Snapshot.EachKey (EachObject must agree).
func contents(ix *index) map[Key][]Object {
	s := &Snapshot{objects: ix}
	out := map[Key][]Object{}
	s.EachKey(func(k Key, copies []Object) bool {
		if _, dup := out[k]; dup || len(copies) == 0 {
			panic("a key listed twice or with no copies")
		}
		out[k] = append([]Object(nil), copies...)
		return true
	})
	n := 0
	s.EachObject(func(k Key, o *Object) bool {
		if len(out[k]) == 0 {
			panic("an object EachKey did not list")
		}
		n++
		return true
	})
	if n != ix.count {
		panic("EachObject and count disagree")
	}
	return out
}
