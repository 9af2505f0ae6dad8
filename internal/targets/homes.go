package targets

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"unicode/utf8"
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

// Shared homes. Every copy a target stores in one bucket, under one name prefix, with one media
// type repeats those and the target's UID: about half of a compact record. A record written with
// EncodingHomeRef holds instead a reference to a home record, stored once at homes/<ref>, where
// ref is the first 16 bytes of the SHA-256 of the home record's value, in hex. The reference
// names the value, so a replica checks every home record it reads against its key and never
// resolves a record to a home other than the one it was written with; with 128 bits, finding two
// homes with one reference (which would let a fill's media type choose another target's home) is
// out of reach.
//
// A record and its home are written in one transaction (Registry.homeOp), the home first, and
// rewritten whenever its value is not the one named: a home deleted or edited behind Detour's back
// comes back with the next record that names it. Detour never deletes a home: there are as many
// as targets times the places each has stored copies at, not as many as copies. A record whose
// home a replica does not hold is not served, and logged.

// homeRef names a home record.
type homeRef [16]byte

func (r homeRef) String() string { return hex.EncodeToString(r[:]) }

// parseHomeRef parses 32 lower-case hex digits.
func parseHomeRef(s []byte) (homeRef, bool) {
	var r homeRef
	ok := unhexInto(r[:], s)
	return r, ok
}

// sharedHome is a decoded home record: a Home without its target, which the object record's key
// names.
type sharedHome struct {
	targetUID, bucket, prefix, mediaType string
}

// homeRecord is a home record to write.
type homeRecord struct {
	ref   homeRef
	value []byte
}

const homeVersion = 1

// newHomeRecord encodes a home: a version byte (1), then the target UID, the bucket, the name
// prefix and the media type, each length-prefixed.
func newHomeRecord(targetUID, bucket, prefix, mediaType string) *homeRecord {
	v := make([]byte, 1, 5+len(targetUID)+len(bucket)+len(prefix)+len(mediaType))
	v[0] = homeVersion
	for _, s := range []string{targetUID, bucket, prefix, mediaType} {
		v = binary.AppendUvarint(v, uint64(len(s)))
		v = append(v, s...)
	}
	return &homeRecord{ref: refOf(v), value: v}
}

func refOf(v []byte) homeRef {
	sum := sha256.Sum256(v)
	return homeRef(sum[:16])
}

var errHome = errors.New("malformed home record")

// decodeHome decodes the home record stored under ref.
func decodeHome(ref homeRef, v []byte) (sharedHome, error) {
	if refOf(v) != ref {
		return sharedHome{}, fmt.Errorf("%w: its value is not the one its key names", errHome)
	}
	if len(v) == 0 || v[0] != homeVersion {
		return sharedHome{}, fmt.Errorf("%w: unknown version", errHome)
	}
	d := decoder{b: v[1:]}
	uid, bucket, prefix, mediaType := d.bytes(), d.bytes(), d.bytes(), d.bytes()
	if d.bad || len(d.b) != 0 {
		return sharedHome{}, fmt.Errorf("%w: truncated or too long", errHome)
	}
	for _, s := range [][]byte{uid, bucket, prefix, mediaType} {
		if !utf8.Valid(s) {
			return sharedHome{}, fmt.Errorf("%w: a string is not UTF-8", errHome)
		}
	}
	return sharedHome{targetUID: string(uid), bucket: string(bucket), prefix: string(prefix), mediaType: string(mediaType)}, nil
}
