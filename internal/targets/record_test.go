package targets

import (
	"bytes"
	"encoding/hex"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// testRecord is a well-formed READY record of key at target (as a verified fill writes it).
func testRecord(key, target, uid, bucket string, size uint64, created time.Time, ttl time.Duration) *pb.StoredObject {
	o := &pb.StoredObject{Key: key, Target: target, State: pb.ObjectState_OBJECT_STATE_READY, Size: size,
		MediaType: "application/mercurial-cbor", Sha256: make([]byte, 32), Sha1: make([]byte, 20), Created: timestamppb.New(created),
		ObjectName: "objects/" + key, Bucket: bucket, TargetUid: uid, Generation: 1}
	if ttl > 0 {
		o.Expires = timestamppb.New(created.Add(ttl))
	}
	return o
}

// typicalRecord is a record as a fill writes it in production: real-length digests, a bucket and a
// prefix, a generation and both timestamps.
func typicalRecord() *pb.StoredObject {
	key := strings.Repeat("5e", 32)
	return &pb.StoredObject{Key: key, Target: "gcs-us-east1", State: pb.ObjectState_OBJECT_STATE_READY, Size: 3_456_789,
		MediaType: "application/mercurial-cbor", Sha256: bytes.Repeat([]byte{0xab}, 32), Sha1: bytes.Repeat([]byte{0xcd}, 20),
		Created: &timestamppb.Timestamp{Seconds: 1_800_000_000, Nanos: 123_456_789}, Expires: &timestamppb.Timestamp{Seconds: 1_802_592_000, Nanos: 123_456_789},
		ObjectName: "hg/objects/" + key, Bucket: "detour-us-east1-objects", Generation: 1_800_000_000_123_456, Crc32C: 0xdeadbeef,
		TargetUid: "0123456789abcdef0123456789abcdef"}
}

func TestRecordsRoundTripInBothEncodings(t *testing.T) {
	edits := map[string]func(o *pb.StoredObject){
		"typical":              func(o *pb.StoredObject) {},
		"no expiry":            func(o *pb.StoredObject) { o.Expires = nil },
		"no created":           func(o *pb.StoredObject) { o.Created = nil },
		"epoch created":        func(o *pb.StoredObject) { o.Created = &timestamppb.Timestamp{} },
		"before 1970":          func(o *pb.StoredObject) { o.Created = &timestamppb.Timestamp{Seconds: -86_400 * 365, Nanos: 5} },
		"beyond nanoseconds":   func(o *pb.StoredObject) { o.Expires = &timestamppb.Timestamp{Seconds: 1 << 40} },
		"negative nanos":       func(o *pb.StoredObject) { o.Expires = &timestamppb.Timestamp{Seconds: 10, Nanos: -1} },
		"name not prefix+key":  func(o *pb.StoredObject) { o.ObjectName = "elsewhere/x" },
		"name is the key":      func(o *pb.StoredObject) { o.ObjectName = o.Key },
		"filling":              func(o *pb.StoredObject) { o.State = pb.ObjectState_OBJECT_STATE_FILLING },
		"unknown state":        func(o *pb.StoredObject) { o.State = 99 },
		"short digests":        func(o *pb.StoredObject) { o.Sha256, o.Sha1 = []byte{1}, nil },
		"empty strings":        func(o *pb.StoredObject) { o.MediaType, o.Bucket, o.TargetUid = "", "", "" },
		"negative generation":  func(o *pb.StoredObject) { o.Generation = -7 },
		"largest size":         func(o *pb.StoredObject) { o.Size = math.MaxUint64 },
		"non-ASCII bucket":     func(o *pb.StoredObject) { o.Bucket = "bücket" },
		"zero everything else": func(o *pb.StoredObject) { *o = pb.StoredObject{Key: o.Key, Target: o.Target} },
		"transient":            func(o *pb.StoredObject) { o.Transient = true },
		"transient, no expiry": func(o *pb.StoredObject) { o.Transient, o.Expires = true, nil },
	}
	for name, edit := range edits {
		t.Run(name, func(t *testing.T) {
			o := typicalRecord()
			edit(o)
			for _, enc := range []RecordEncoding{EncodingHomeRef, EncodingCompact, EncodingProto} {
				v, home := encodeRecord(o, enc)
				got, err := decodeStored(o.Key, o.Target, v, homeLookup(t, home))
				if err != nil {
					t.Fatalf("%s: %v", enc, err)
				}
				if !proto.Equal(got, o) {
					t.Fatalf("%s: decoded\n%v\nwant\n%v", enc, got, o)
				}
			}
		})
	}
}

// homeLookup finds the one home record h (none if nil), as etcd would hold it.
func homeLookup(t *testing.T, h *homeRecord) func(homeRef) (*sharedHome, bool) {
	return func(ref homeRef) (*sharedHome, bool) {
		if h == nil || ref != h.ref {
			return nil, false
		}
		sh, err := decodeHome(ref, h.value)
		if err != nil {
			t.Fatalf("home %s: %v", ref, err)
		}
		return &sh, true
	}
}

// DecodeObject decodes a record that holds its home.
func DecodeObject(key, target string, v []byte) (*pb.StoredObject, error) {
	return decodeStored(key, target, v, nil)
}

// EncodeObject encodes a record as enc writes it, without the home record it may name.
func EncodeObject(o *pb.StoredObject, enc RecordEncoding) []byte {
	v, _ := encodeRecord(o, enc)
	return v
}

// A fill's record names a shared home, and is about half the compact record that holds it; one
// whose object name is not a prefix followed by its key holds its home; a record that names a home
// nobody stored does not decode.
func TestRecordsNameASharedHome(t *testing.T) {
	o := typicalRecord()
	v, home := encodeRecord(o, EncodingHomeRef)
	c := EncodeObject(o, EncodingCompact)
	t.Logf("typical record: %d bytes naming a %d-byte home, %d holding it", len(v), len(home.value), len(c))
	if home == nil || v[2]&flagHomeRef == 0 || len(v)*10 > len(c)*6 {
		t.Fatalf("record %d bytes (flags %#x), home %v; %d holding it", len(v), v[2], home, len(c))
	}
	other := typicalRecord()
	other.Key, other.ObjectName, other.Size = strings.Repeat("77", 32), "hg/objects/"+strings.Repeat("77", 32), 1
	if _, h2 := encodeRecord(other, EncodingHomeRef); h2 == nil || h2.ref != home.ref || !bytes.Equal(h2.value, home.value) {
		t.Fatalf("another copy in the same home names %v, not %v", h2, home)
	}
	elsewhere := typicalRecord()
	elsewhere.Bucket = "another-bucket"
	if _, h3 := encodeRecord(elsewhere, EncodingHomeRef); h3 == nil || h3.ref == home.ref {
		t.Fatalf("a copy in another bucket names %v, the first's %v", h3, home)
	}
	o.ObjectName = "elsewhere/x"
	if v, h := encodeRecord(o, EncodingHomeRef); h != nil || v[2]&flagHomeRef != 0 {
		t.Fatalf("a record whose name is not prefix+key named home %v", h)
	}
	if _, err := DecodeObject(o.Key, o.Target, v); err == nil || !strings.Contains(err.Error(), home.ref.String()) {
		t.Fatalf("a record whose home is not stored: %v", err)
	}
}

// A home record is checked against the reference its key holds: a value edited behind Detour's
// back, or stored under another reference, is refused.
func TestHomeRecordsAreTheOnesTheirKeyNames(t *testing.T) {
	h := newHomeRecord("uid", "bucket", "hg/objects/", "application/mercurial-cbor")
	if got, err := decodeHome(h.ref, h.value); err != nil || got != (sharedHome{"uid", "bucket", "hg/objects/", "application/mercurial-cbor"}) {
		t.Fatalf("decoded %+v, %v", got, err)
	}
	edited := slices.Clone(h.value)
	edited[len(edited)-1] ^= 1
	if _, err := decodeHome(h.ref, edited); err == nil {
		t.Fatal("an edited home decoded")
	}
	other := newHomeRecord("uid", "other-bucket", "hg/objects/", "application/mercurial-cbor")
	if _, err := decodeHome(h.ref, other.value); err == nil {
		t.Fatal("another home decoded under this one's reference")
	}
	for _, bad := range [][]byte{nil, {2}, {1, 3, 'a'}, append(slices.Clone(h.value), 0), {1, 1, 0xff, 0, 0, 0}} {
		if _, err := decodeHome(refOf(bad), bad); err == nil {
			t.Errorf("%x decoded", bad)
		}
	}
	if r, ok := parseHomeRef([]byte(h.ref.String())); !ok || r != h.ref {
		t.Fatalf("parse %s: %v, %v", h.ref, r, ok)
	}
	for _, bad := range []string{"", h.ref.String()[1:], strings.ToUpper(h.ref.String()), h.ref.String() + "0"} {
		if _, ok := parseHomeRef([]byte(bad)); ok {
			t.Errorf("%q parsed", bad)
		}
	}
}

// The compact encoding is what etcd stores a million times over: it must be much smaller than the
// proto one, and a stored proto record (every release before it wrote one) must still decode.
func TestCompactRecordsAreSmallerAndProtoRecordsStillDecode(t *testing.T) {
	o := typicalRecord()
	c, p := EncodeObject(o, EncodingCompact), EncodeObject(o, EncodingProto)
	t.Logf("typical record: compact %d bytes, proto %d bytes", len(c), len(p))
	if c[0] != 0 || p[0] == 0 {
		t.Fatalf("first bytes: compact %#x, proto %#x", c[0], p[0])
	}
	if len(c)*10 > len(p)*6 {
		t.Fatalf("compact record %d bytes, proto %d: less than 40 %% saved", len(c), len(p))
	}
	old, err := proto.Marshal(o) // not deterministic, as any older writer might have written it
	if err != nil {
		t.Fatal(err)
	}
	if got, err := DecodeObject("ignored", "ignored", old); err != nil || !proto.Equal(got, o) {
		t.Fatalf("a proto record: %v, %v", got, err)
	}
}

// typicalCompact is typicalRecord as the compact encoding wrote it before records had a lifetime
// class (StoredObject.transient).
const typicalCompact = "0001070295fed201aab4feb0d39df1fa31aab48ea5f4f78b84328089d389e5c5b206efbeadde20ababababababababababababababababab" +
	"ababababababababababababababab14cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd1a6170706c69636174696f6e2f6d657263757269" +
	"616c2d63626f72176465746f75722d75732d65617374312d6f626a656374730b68672f6f626a656374732f20303132333435363738396162" +
	"6364656630313233343536373839616263646566"

// The lifetime class is a flag bit that only transient records set: a record written before it
// decodes as not transient, and a record that is not transient is still written byte for byte as
// before (a replica of an older release reads it).
func TestRecordsWithoutALifetimeClassAreUnchanged(t *testing.T) {
	old, err := hex.DecodeString(typicalCompact)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeObject(typicalRecord().Key, typicalRecord().Target, old)
	if err != nil || got.Transient || !proto.Equal(got, typicalRecord()) {
		t.Fatalf("a record written before the lifetime class: %v, %v", got, err)
	}
	if now := EncodeObject(typicalRecord(), EncodingCompact); !bytes.Equal(now, old) {
		t.Fatalf("a record that is not transient is written differently:\n%x\nwas\n%x", now, old)
	}
	o := typicalRecord()
	o.Transient = true
	v := EncodeObject(o, EncodingCompact)
	if len(v) != len(old) || v[2] != old[2]|flagTransient {
		t.Fatalf("a transient record is not the same record with one more flag:\n%x\n%x", v, old)
	}
}

func TestMalformedCompactRecordsAreRefused(t *testing.T) {
	v := EncodeObject(typicalRecord(), EncodingCompact)
	named, home := encodeRecord(typicalRecord(), EncodingHomeRef)
	for _, v := range [][]byte{v, named} {
		for n := 1; n < len(v); n++ { // (none at all is an empty proto record)
			if _, err := decodeStored("k", "t", v[:n], homeLookup(t, home)); err == nil {
				t.Fatalf("a record cut to %d of %d bytes decoded", n, len(v))
			}
		}
	}
	for name, bad := range map[string][]byte{
		"trailing byte":   append(slices.Clone(v), 0),
		"unknown version": append([]byte{0, 2}, v[2:]...),
		"unknown flag":    append([]byte{0, 1, v[2] | 0x80}, v[3:]...),
		"home without prefix flag": func() []byte {
			r, _ := encodeRecord(typicalRecord(), EncodingHomeRef)
			return append([]byte{0, 1, r[2] &^ flagNamePrefix}, r[3:]...)
		}(),
	} {
		if _, err := DecodeObject("k", "t", bad); err == nil {
			t.Errorf("%s: decoded", name)
		}
	}
}

// The watcher decodes proto records without building the message; it must read exactly what
// proto.Unmarshal reads, and refuse what it refuses.
func FuzzProtoRecordsDecodeAsProtoUnmarshalDoes(f *testing.F) {
	transient := typicalRecord()
	transient.Transient = true
	for _, o := range []*pb.StoredObject{typicalRecord(), {}, {Key: "k", Created: &timestamppb.Timestamp{Seconds: -1, Nanos: 1}}, transient} {
		b, _ := proto.Marshal(o)
		f.Add(b)
	}
	f.Add([]byte{0x42, 0x02, 0x08, 0x01, 0x42, 0x02, 0x10, 0x05})                   // created twice: the two merge
	f.Add([]byte{0x18, 0x80, 0x80, 0x80, 0x80, 0x10})                               // a state beyond int32
	f.Add([]byte{0x0a, 0x01, 0xff})                                                 // a key that is not UTF-8
	f.Add([]byte{0x25, 1, 2, 3, 4})                                                 // size as fixed32: unknown
	f.Add([]byte{0x78, 0x02})                                                       // transient as 2: true
	f.Add([]byte{0x78, 0x01, 0x78, 0x00})                                           // transient twice: the last wins
	f.Add([]byte{0x78, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01}) // a 64-bit varint
	f.Add([]byte{0x7a, 0x01, 0x01})                                                 // transient as bytes: unknown
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 0 && b[0] == 0 {
			return // the compact encoding's marker
		}
		want := &pb.StoredObject{}
		werr := proto.Unmarshal(b, want)
		got, err := DecodeObject("", "", b)
		if (err == nil) != (werr == nil) {
			t.Fatalf("decode: %v; proto.Unmarshal: %v", err, werr)
		}
		// Unknown fields are kept by proto.Unmarshal, and read by nobody.
		want.ProtoReflect().SetUnknown(nil)
		for _, ts := range []*timestamppb.Timestamp{want.Created, want.Expires} {
			if ts != nil {
				ts.ProtoReflect().SetUnknown(nil)
			}
		}
		if err == nil && !proto.Equal(got, want) {
			t.Fatalf("decoded\n%v\nproto.Unmarshal\n%v", got, want)
		}
	})
}

// Compact records and home records come from etcd: whatever their bytes, decoding them never
// panics, and what decodes encodes back to a record or home that decodes the same.
func FuzzCompactRecordsAndHomes(f *testing.F) {
	named, home := encodeRecord(typicalRecord(), EncodingHomeRef)
	f.Add(named, home.value)
	f.Add(EncodeObject(typicalRecord(), EncodingCompact), []byte{homeVersion, 0, 0, 0, 0})
	f.Add([]byte{0, 1, flagHomeRef}, []byte{homeVersion, 0x80})
	f.Fuzz(func(t *testing.T, v, hv []byte) {
		ref := refOf(hv)
		h, herr := decodeHome(ref, hv)
		if herr == nil {
			if again := newHomeRecord(h.targetUID, h.bucket, h.prefix, h.mediaType); again.ref != ref {
				// Non-minimal varints decode but encode differently: the same home, another ref.
				if got, err := decodeHome(again.ref, again.value); err != nil || got != h {
					t.Fatalf("home %+v re-encoded decodes as %+v, %v", h, got, err)
				}
			}
		}
		if len(v) == 0 || v[0] != 0 {
			return // proto: FuzzProtoRecordsDecodeAsProtoUnmarshalDoes
		}
		var r record
		if r.decode(v) != nil {
			return
		}
		if r.hasRef && !r.namePrefix {
			t.Fatal("a record that names its home without a name prefix decoded")
		}
		lookup := func(got homeRef) (*sharedHome, bool) { return &h, herr == nil && got == r.ref }
		key := strings.Repeat("ab", 32)
		o, err := decodeStored(key, "t", v, lookup)
		if err != nil {
			if r.hasRef && herr == nil && r.ref == ref {
				t.Fatalf("a record naming a stored home: %v", err)
			}
			return
		}
		for _, enc := range []RecordEncoding{EncodingHomeRef, EncodingCompact} {
			again, h2 := encodeRecord(o, enc)
			got, err := decodeStored(key, "t", again, homeLookup(t, h2))
			if err != nil || !proto.Equal(got, o) {
				t.Fatalf("%s: %v decoded, re-encoded and decoded: %v, %v", enc, o, got, err)
			}
		}
	})
}
