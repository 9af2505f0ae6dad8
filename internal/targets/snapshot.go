package targets

import (
	"encoding/hex"
	"sort"
	"strings"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Home is where a set of stored objects live and what they are: the target (by name and uid), the
// bucket and prefix they were stored under, and their media type. Copies share one interned Home,
// so an object pays four bytes for all of it.
type Home struct {
	Target    string
	TargetUID string
	Bucket    string
	Prefix    string
	MediaType string
}

// Object is the in-memory form of one READY copy: compact, because a replica holds millions, and
// free of pointers, so that the garbage collector never scans the index. Its object name is the
// home's prefix followed by the key.
type Object struct {
	Size        uint64
	Created     int64 // unix nanoseconds
	Expires     int64 // unix nanoseconds; 0: never
	ModRevision int64
	Generation  int64
	SHA256      [32]byte
	SHA1        [20]byte
	CRC32C      uint32
	home        homeID
	// Transient is the copy's lifetime class (StoredObject.transient): its expiry follows the
	// policy's transient_object_ttl. (The field fits in the struct's padding.)
	Transient bool
}

// Home is where the copy is.
func (o *Object) Home() *Home { return homes.get(o.home) }

// Target is the name of the target the copy is at.
func (o *Object) Target() string { return o.Home().Target }

// ObjectName is the copy's name in its bucket.
func (o *Object) ObjectName(key Key) string { return o.Home().Prefix + key.String() }

// ExpiresAt is Expires as a time (zero: never).
func (o *Object) ExpiresAt() time.Time {
	if o.Expires == 0 {
		return time.Time{}
	}
	return time.Unix(0, o.Expires)
}

// Proto returns the API (and stored) form of the copy of key.
func (o *Object) Proto(key Key) *pb.StoredObject {
	h := o.Home()
	out := &pb.StoredObject{Key: key.String(), Target: h.Target, State: pb.ObjectState_OBJECT_STATE_READY, Size: o.Size,
		MediaType: h.MediaType, Sha256: append([]byte(nil), o.SHA256[:]...), Sha1: append([]byte(nil), o.SHA1[:]...),
		ObjectName: o.ObjectName(key), Bucket: h.Bucket, Generation: o.Generation, Crc32C: o.CRC32C, TargetUid: h.TargetUID,
		Transient: o.Transient}
	out.Created = tsOf(o.Created)
	if o.Expires != 0 {
		out.Expires = tsOf(o.Expires)
	}
	return out
}

// Servable reports whether the copy is where target t keeps its objects now: same target uid (not a
// deleted target's namesake) and same bucket (the store has not moved). Copies that are not are
// never redirected to, and the janitor removes them.
func (o *Object) Servable(t *pb.Target) bool {
	h := o.Home()
	return h.TargetUID == t.GetUid() && h.Bucket == t.GetStore().GetBucket()
}

// Key is a content key in binary (a SHA-256).
type Key [32]byte

// ParseKey parses 64 lower-case hex digits.
func ParseKey(s string) (Key, bool) {
	var k Key
	if len(s) != 64 || strings.ToLower(s) != s {
		return k, false
	}
	_, err := hex.Decode(k[:], []byte(s))
	return k, err == nil
}

func (k Key) String() string { return hex.EncodeToString(k[:]) }

// Snapshot is Detour's whole state at one etcd revision. It is immutable once published.
type Snapshot struct {
	Revision int64
	// TargetsRevision is the revision at which the targets, their liveness or the policy last
	// changed. Object and claim events leave it alone, so consumers of the target set (the
	// placement view, WatchTargets) can skip the snapshots that only indexed a fill.
	TargetsRevision int64
	// Built is when the snapshot was made current.
	Built time.Time
	// applied is the revision whose every event (and every earlier one) the snapshot holds.
	// Revision may be ahead of it: a watch response's header revision is etcd's current one,
	// also while the watch is still sending older events in batches.
	applied int64
	targets map[string]*pb.Target // Healthy, UnhealthyReason and Revision filled in
	alive   map[string]bool
	health  map[string]*pb.TargetHealth
	policy  *pb.Policy
	objects *index
	claims  map[string]*pb.FillClaim
	agents  map[string]*pb.Agent // by id
	// homes are the shared home records (homes.go), which records name and are decoded with.
	homes map[homeRef]*sharedHome
	// superseded is closed when a newer snapshot replaces this one.
	superseded chan struct{}
	// provisional: the snapshot is a clean stop's or the embedded etcd's database file's, served
	// while etcd restarts (ServeCleanStop, ServeMemberCopy).
	provisional bool
}

func emptySnapshot() *Snapshot {
	return &Snapshot{targets: map[string]*pb.Target{}, alive: map[string]bool{}, health: map[string]*pb.TargetHealth{}, objects: &index{},
		claims: map[string]*pb.FillClaim{}, agents: map[string]*pb.Agent{}, homes: map[homeRef]*sharedHome{}, policy: &pb.Policy{},
		superseded: make(chan struct{})}
}

// Provisional reports whether the snapshot is a clean stop's or the embedded etcd's database
// file's, served while etcd restarts: etcd has not confirmed it yet, and nothing may be written on
// its word.
func (s *Snapshot) Provisional() bool { return s.provisional }

// Superseded is closed when a newer snapshot is current.
func (s *Snapshot) Superseded() <-chan struct{} { return s.superseded }

// Target returns a registered target (do not modify it).
func (s *Snapshot) Target(name string) (*pb.Target, bool) {
	t, ok := s.targets[name]
	return t, ok
}

// Targets returns all targets sorted by name (do not modify them).
func (s *Snapshot) Targets() []*pb.Target {
	out := make([]*pb.Target, 0, len(s.targets))
	for _, t := range s.targets {
		out = append(out, t)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Policy returns the stored policy (an empty one when none is stored; do not modify it).
func (s *Snapshot) Policy() *pb.Policy { return s.policy }

// Copies returns the READY copies of key (do not modify them).
func (s *Snapshot) Copies(key Key) []Object { return s.objects.get(key) }

// ObjectCount is the number of copies in the index.
func (s *Snapshot) ObjectCount() int { return s.objects.count }

// Claim returns the live fill claim on key, if any.
func (s *Snapshot) Claim(key string) (*pb.FillClaim, bool) {
	c, ok := s.claims[key]
	return c, ok
}

// EachObject calls fn for every copy, in no particular order, until fn returns false.
func (s *Snapshot) EachObject(fn func(key Key, o *Object) bool) {
	s.objects.each(func(sh *shard) bool {
		for i := range sh.objs {
			if !fn(sh.keys[i], &sh.objs[i]) {
				return false
			}
		}
		return true
	})
}

// EachKey calls fn with every key and all its copies, in no particular order, until fn returns
// false (do not modify the copies).
func (s *Snapshot) EachKey(fn func(key Key, copies []Object) bool) {
	s.objects.each(func(sh *shard) bool {
		for i := 0; i < len(sh.keys); {
			j := sh.end(i)
			if !fn(sh.keys[i], sh.objs[i:j:j]) {
				return false
			}
			i = j
		}
		return true
	})
}

// Health returns the prober's last verdict on a target, if any.
func (s *Snapshot) Health(name string) (*pb.TargetHealth, bool) {
	h, ok := s.health[name]
	return h, ok
}

// RangeObjects calls fn for copies in key order, from the first key > after (all if after is
// zero-length), until fn returns false. Sorting makes it O(n log n): it serves paginated admin
// listings, not the request path.
func (s *Snapshot) RangeObjects(after string, fn func(key Key, o *Object) bool) {
	var keys []Key
	s.objects.each(func(sh *shard) bool {
		for i := 0; i < len(sh.keys); i = sh.end(i) {
			if k := sh.keys[i]; after == "" || k.String() > after {
				keys = append(keys, k)
			}
		}
		return true
	})
	sort.Slice(keys, func(i, j int) bool { return string(keys[i][:]) < string(keys[j][:]) })
	for _, k := range keys {
		copies := s.objects.get(k)
		for i := range copies {
			if !fn(k, &copies[i]) {
				return
			}
		}
	}
}
