package targets

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Object records are stored in etcd in one of two encodings, and read in both:
//
//   - proto: a StoredObject message, what every release before the compact encoding wrote. Its
//     first byte is a field tag, never 0.
//   - compact: byte 0, a version (1), a flags byte, then the record's fields in a fixed order,
//     without the content key and the target (the etcd key holds both) and with the object name
//     cut to what precedes the key. Strings and digests are length-prefixed, integers varints;
//     booleans are flags. A flag added later (flagTransient) is unset in every record written
//     before it, so those read as they always did; a release that predates a flag refuses records
//     that set it (see flagTransient).
//
// A compact record may name its home instead of holding it (flagHomeRef): the target's UID, the
// bucket, the object name's prefix and the media type, which every copy a target stores in one
// place repeats, are then a home record of their own (homes/<ref>, homes.go), and the record holds
// its 16-byte reference. That is about half of a compact record.
//
// A record is what etcd stores a million times over, and what a replica decodes a million times
// at start: the compact form is about half the size, and both forms are decoded here without
// allocating.

// RecordEncoding is how a Registry writes object records.
type RecordEncoding int

const (
	// EncodingHomeRef is the default: compact records that name a shared home record where they
	// can (a fill's always can), read only by releases that know homes (flagHomeRef).
	EncodingHomeRef RecordEncoding = iota
	// EncodingCompact holds each record's home in the record, for a fleet that still runs replicas
	// of a release that reads compact records but not shared homes.
	EncodingCompact
	// EncodingProto is the StoredObject message, for a fleet that still runs replicas of a release
	// that reads nothing else (they would skip compact records, and their reconciler would take
	// the stored bytes of those records for orphans).
	EncodingProto
)

// ParseRecordEncoding parses "home-ref", "compact" or "proto".
func ParseRecordEncoding(s string) (RecordEncoding, error) {
	switch s {
	case "home-ref":
		return EncodingHomeRef, nil
	case "compact":
		return EncodingCompact, nil
	case "proto":
		return EncodingProto, nil
	}
	return 0, invalid("record encoding", "%s is none of home-ref, compact and proto", quote(s))
}

func (e RecordEncoding) String() string {
	switch e {
	case EncodingProto:
		return "proto"
	case EncodingCompact:
		return "compact"
	}
	return "home-ref"
}

const compactVersion = 1

// Flags of a compact record.
const (
	flagCreated    = 1 << iota // created is present
	flagExpires                // expires is present
	flagNamePrefix             // the object name is the stored name followed by the key
	// flagTransient is StoredObject.transient. Only transient records set it, so every other
	// record is byte for byte what releases before it wrote and read; a replica of such a release
	// skips a transient record as malformed (it never redirects to it, and its reconciler may
	// take the bytes for an orphan). Control planes are upgraded before the agents that send
	// transient requests; a fleet that cannot do that writes proto records (SetRecordEncoding).
	flagTransient
	// flagHomeRef: the record holds a 16-byte home reference where the media type, bucket, name
	// prefix and target UID would be (flagNamePrefix is set with it). A release that predates it
	// refuses the record, as for flagTransient: EncodingCompact is for a fleet that has one.
	flagHomeRef

	knownFlags = flagCreated | flagExpires | flagNamePrefix | flagTransient | flagHomeRef
)

// record is a decoded object record. Its byte slices point into the stored value; key and target
// are set only by the proto encoding (the compact one leaves them to the etcd key).
type record struct {
	key, target                   []byte
	state                         pb.ObjectState
	size                          uint64
	mediaType, bucket, targetUID  []byte
	sha256, sha1                  []byte
	created, expires              int64 // unix nanoseconds
	hasCreated, hasExpires        bool
	name                          []byte
	namePrefix                    bool // name is the object name's part before the key
	transient                     bool
	generation                    int64
	crc32c                        uint32
	createdSec, expiresSec        int64 // proto only: the timestamps as stored, for a faithful copy
	createdNanos, expiresNanos    int32
	protoEncoded                  bool
	keyFromValue, targetFromValue bool
	// hasRef: the record names its home (ref) and holds none of mediaType, bucket, name and
	// targetUID until resolve fills them in.
	hasRef bool
	ref    homeRef
}

var errRecord = errors.New("malformed object record")

// encodeRecord encodes o, whose Key and Target the etcd key holds, and the home record it names,
// if it names one (nil otherwise). A record the compact form cannot hold exactly (a timestamp
// beyond the years 1678–2262, in nanoseconds) is written as proto; one whose object name is not
// a prefix followed by the key holds its home.
func encodeRecord(o *pb.StoredObject, enc RecordEncoding) ([]byte, *homeRecord) {
	if enc != EncodingProto {
		if b, h, ok := compactRecord(o, enc == EncodingHomeRef); ok {
			return b, h
		}
	}
	return []byte(marshal(o)), nil
}

func compactRecord(o *pb.StoredObject, shareHome bool) ([]byte, *homeRecord, bool) {
	var flags byte
	var created, expires int64
	var ok bool
	if o.Created != nil {
		if created, ok = nanos(o.Created); !ok {
			return nil, nil, false
		}
		flags |= flagCreated
	}
	if o.Expires != nil {
		if expires, ok = nanos(o.Expires); !ok {
			return nil, nil, false
		}
		flags |= flagExpires
	}
	if o.Transient {
		flags |= flagTransient
	}
	name := o.ObjectName
	if o.Key != "" && len(name) >= len(o.Key) && name[len(name)-len(o.Key):] == o.Key {
		name, flags = name[:len(name)-len(o.Key)], flags|flagNamePrefix
	}
	var home *homeRecord
	if shareHome && flags&flagNamePrefix != 0 {
		home, flags = newHomeRecord(o.TargetUid, o.Bucket, name, o.MediaType), flags|flagHomeRef
	}
	b := make([]byte, 0, 64+len(o.MediaType)+len(o.Sha256)+len(o.Sha1)+len(name)+len(o.Bucket)+len(o.TargetUid))
	b = append(b, 0, compactVersion, flags)
	b = binary.AppendUvarint(b, uint64(uint32(o.State)))
	b = binary.AppendUvarint(b, o.Size)
	b = binary.AppendVarint(b, created)
	b = binary.AppendVarint(b, expires)
	b = binary.AppendVarint(b, o.Generation)
	b = binary.LittleEndian.AppendUint32(b, o.Crc32C)
	for _, s := range [][]byte{o.Sha256, o.Sha1} {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	if home != nil {
		return append(b, home.ref[:]...), home, true
	}
	for _, s := range []string{o.MediaType, o.Bucket, name, o.TargetUid} {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	return b, nil, true
}

// nanos is t in unix nanoseconds, if that holds it exactly.
func nanos(t *timestamppb.Timestamp) (int64, bool) {
	s, n := t.GetSeconds(), int64(t.GetNanos())
	if n < 0 || n >= 1e9 || s < math.MinInt64/int64(time.Second)+1 || s > math.MaxInt64/int64(time.Second)-1 {
		return 0, false
	}
	return s*1e9 + n, true
}

// decode parses a stored record in either encoding.
func (r *record) decode(v []byte) error {
	*r = record{}
	if len(v) > 0 && v[0] == 0 {
		return r.decodeCompact(v)
	}
	r.protoEncoded = true
	return r.decodeProto(v)
}

func (r *record) decodeCompact(v []byte) error {
	if len(v) < 3 || v[1] != compactVersion {
		return fmt.Errorf("%w: compact record of an unknown version", errRecord)
	}
	flags := v[2]
	d := decoder{b: v[3:]}
	r.state = pb.ObjectState(int32(d.uvarint()))
	r.size = d.uvarint()
	r.created, r.expires, r.generation = d.varint(), d.varint(), d.varint()
	r.crc32c = d.uint32()
	r.sha256, r.sha1 = d.bytes(), d.bytes()
	r.hasRef = flags&flagHomeRef != 0
	if r.hasRef {
		copy(r.ref[:], d.fixed(len(r.ref)))
	} else {
		r.mediaType, r.bucket, r.name, r.targetUID = d.bytes(), d.bytes(), d.bytes(), d.bytes()
	}
	if d.bad || len(d.b) != 0 {
		return fmt.Errorf("%w: compact record truncated or too long", errRecord)
	}
	r.hasCreated, r.hasExpires, r.namePrefix = flags&flagCreated != 0, flags&flagExpires != 0, flags&flagNamePrefix != 0
	r.transient = flags&flagTransient != 0
	if !r.hasCreated && r.created != 0 || !r.hasExpires && r.expires != 0 || flags&^knownFlags != 0 || r.hasRef && !r.namePrefix {
		return fmt.Errorf("%w: compact record with inconsistent flags", errRecord)
	}
	for _, s := range [][]byte{r.mediaType, r.bucket, r.name, r.targetUID} {
		if !utf8.Valid(s) {
			return fmt.Errorf("%w: a string is not UTF-8", errRecord)
		}
	}
	return nil
}

type decoder struct {
	b   []byte
	bad bool
}

func (d *decoder) uvarint() uint64 {
	x, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.bad, d.b = true, nil
		return 0
	}
	d.b = d.b[n:]
	return x
}

func (d *decoder) varint() int64 {
	x, n := binary.Varint(d.b)
	if n <= 0 {
		d.bad, d.b = true, nil
		return 0
	}
	d.b = d.b[n:]
	return x
}

func (d *decoder) uint32() uint32 {
	if len(d.b) < 4 {
		d.bad, d.b = true, nil
		return 0
	}
	x := binary.LittleEndian.Uint32(d.b)
	d.b = d.b[4:]
	return x
}

func (d *decoder) fixed(n int) []byte {
	if len(d.b) < n {
		d.bad, d.b = true, nil
		return nil
	}
	s := d.b[:n:n]
	d.b = d.b[n:]
	return s
}

func (d *decoder) bytes() []byte {
	n := d.uvarint()
	if d.bad || n > uint64(len(d.b)) {
		d.bad, d.b = true, nil
		return nil
	}
	s := d.b[:n:n]
	d.b = d.b[n:]
	return s
}

// StoredObject field numbers (api/proto/detour/v1/target.proto).
const (
	fieldKey        = 1
	fieldTarget     = 2
	fieldState      = 3
	fieldSize       = 4
	fieldMediaType  = 5
	fieldSha256     = 6
	fieldSha1       = 7
	fieldCreated    = 8
	fieldExpires    = 9
	fieldObjectName = 10
	fieldBucket     = 11
	fieldGeneration = 12
	fieldCrc32C     = 13
	fieldTargetUID  = 14
	fieldTransient  = 15
)

// decodeProto parses a StoredObject message the way proto.Unmarshal does (the last value of a
// field wins, timestamps merge, unknown fields are skipped, strings must be UTF-8), without
// building the message.
func (r *record) decodeProto(v []byte) error {
	for len(v) > 0 {
		num, typ, n := protowire.ConsumeTag(v)
		if n < 0 {
			return fmt.Errorf("%w: %w", errRecord, protowire.ParseError(n))
		}
		if num > protowire.MaxValidNumber {
			return fmt.Errorf("%w: field number %d", errRecord, num)
		}
		v = v[n:]
		var x uint64
		var b []byte
		switch typ {
		case protowire.VarintType:
			x, n = protowire.ConsumeVarint(v)
		case protowire.Fixed32Type:
			var x32 uint32
			x32, n = protowire.ConsumeFixed32(v)
			x = uint64(x32)
		case protowire.BytesType:
			b, n = protowire.ConsumeBytes(v)
		default:
			n = protowire.ConsumeFieldValue(num, typ, v)
		}
		if n < 0 {
			return fmt.Errorf("%w: %w", errRecord, protowire.ParseError(n))
		}
		v = v[n:]
		if num <= 0 || int(num) >= len(fieldTypes) || fieldTypes[num] != typ {
			// Unknown, or a known number in another wire type: proto.Unmarshal keeps it as an
			// unknown field, which nothing here reads.
			continue
		}
		if stringField[num] && !utf8.Valid(b) {
			// Every occurrence is checked, also one a later occurrence replaces.
			return fmt.Errorf("%w: field %d is not UTF-8", errRecord, num)
		}
		switch num {
		case fieldKey:
			r.key, r.keyFromValue = b, true
		case fieldTarget:
			r.target, r.targetFromValue = b, true
		case fieldState:
			r.state = pb.ObjectState(int32(x))
		case fieldSize:
			r.size = x
		case fieldMediaType:
			r.mediaType = b
		case fieldSha256:
			r.sha256 = b
		case fieldSha1:
			r.sha1 = b
		case fieldCreated:
			if err := mergeTimestamp(b, &r.createdSec, &r.createdNanos); err != nil {
				return err
			}
			r.hasCreated = true
		case fieldExpires:
			if err := mergeTimestamp(b, &r.expiresSec, &r.expiresNanos); err != nil {
				return err
			}
			r.hasExpires = true
		case fieldObjectName:
			r.name = b
		case fieldBucket:
			r.bucket = b
		case fieldGeneration:
			r.generation = int64(x)
		case fieldCrc32C:
			r.crc32c = uint32(x)
		case fieldTargetUID:
			r.targetUID = b
		case fieldTransient:
			r.transient = x != 0 // as proto.Unmarshal reads a bool: any varint but 0 is true
		}
	}
	// What the watcher has always computed: Timestamp.AsTime().UnixNano().
	if r.hasCreated {
		r.created = time.Unix(r.createdSec, int64(r.createdNanos)).UTC().UnixNano()
	}
	if r.hasExpires {
		r.expires = time.Unix(r.expiresSec, int64(r.expiresNanos)).UTC().UnixNano()
	}
	return nil
}

// fieldTypes is each field's wire type, by number (-1: no such field).
var fieldTypes = [...]protowire.Type{0: -1,
	fieldKey: protowire.BytesType, fieldTarget: protowire.BytesType, fieldState: protowire.VarintType,
	fieldSize: protowire.VarintType, fieldMediaType: protowire.BytesType, fieldSha256: protowire.BytesType,
	fieldSha1: protowire.BytesType, fieldCreated: protowire.BytesType, fieldExpires: protowire.BytesType,
	fieldObjectName: protowire.BytesType, fieldBucket: protowire.BytesType, fieldGeneration: protowire.VarintType,
	fieldCrc32C: protowire.VarintType, fieldTargetUID: protowire.BytesType, fieldTransient: protowire.VarintType,
}

var stringField = [len(fieldTypes)]bool{fieldKey: true, fieldTarget: true, fieldMediaType: true,
	fieldObjectName: true, fieldBucket: true, fieldTargetUID: true}

// mergeTimestamp merges an encoded google.protobuf.Timestamp into sec and nanos.
func mergeTimestamp(v []byte, sec *int64, nanos *int32) error {
	for len(v) > 0 {
		num, typ, n := protowire.ConsumeTag(v)
		if n < 0 {
			return fmt.Errorf("%w: timestamp: %w", errRecord, protowire.ParseError(n))
		}
		if num > protowire.MaxValidNumber {
			return fmt.Errorf("%w: timestamp: field number %d", errRecord, num)
		}
		v = v[n:]
		if typ != protowire.VarintType || (num != 1 && num != 2) {
			if n = protowire.ConsumeFieldValue(num, typ, v); n < 0 {
				return fmt.Errorf("%w: timestamp: %w", errRecord, protowire.ParseError(n))
			}
			v = v[n:]
			continue
		}
		x, n := protowire.ConsumeVarint(v)
		if n < 0 {
			return fmt.Errorf("%w: timestamp: %w", errRecord, protowire.ParseError(n))
		}
		v = v[n:]
		if num == 1 {
			*sec = int64(x)
		} else {
			*nanos = int32(x)
		}
	}
	return nil
}

// proto returns the record as a StoredObject; key and target (from the etcd key) fill in what
// the compact encoding leaves out.
func (r *record) proto(key, target string) *pb.StoredObject {
	o := &pb.StoredObject{Key: key, Target: target, State: r.state, Size: r.size, MediaType: string(r.mediaType),
		Sha256: clone(r.sha256), Sha1: clone(r.sha1), ObjectName: string(r.name), Bucket: string(r.bucket),
		Generation: r.generation, Crc32C: r.crc32c, TargetUid: string(r.targetUID), Transient: r.transient}
	if r.keyFromValue {
		o.Key = string(r.key)
	}
	if r.targetFromValue {
		o.Target = string(r.target)
	}
	if r.namePrefix {
		o.ObjectName += key
	}
	switch {
	case r.protoEncoded && r.hasCreated:
		o.Created = &timestamppb.Timestamp{Seconds: r.createdSec, Nanos: r.createdNanos}
	case r.hasCreated:
		o.Created = tsOf(r.created)
	}
	switch {
	case r.protoEncoded && r.hasExpires:
		o.Expires = &timestamppb.Timestamp{Seconds: r.expiresSec, Nanos: r.expiresNanos}
	case r.hasExpires:
		o.Expires = tsOf(r.expires)
	}
	return o
}

func clone(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return append([]byte(nil), b...)
}

// resolve fills in the home a record names.
func (r *record) resolve(h *sharedHome) {
	r.targetUID, r.bucket, r.name, r.mediaType = []byte(h.targetUID), []byte(h.bucket), []byte(h.prefix), []byte(h.mediaType)
}

// decodeStored decodes a stored object record (any encoding) of key at target, as the etcd key
// names them. home looks up the home a record names (nil: none are known); a record that names one
// it does not find is an error.
func decodeStored(key, target string, value []byte, home func(homeRef) (*sharedHome, bool)) (*pb.StoredObject, error) {
	var r record
	if err := r.decode(value); err != nil {
		return nil, err
	}
	if r.hasRef {
		var h *sharedHome
		ok := home != nil
		if ok {
			h, ok = home(r.ref)
		}
		if !ok {
			return nil, fmt.Errorf("%w: it names home %s, which is not stored", errRecord, r.ref)
		}
		r.resolve(h)
	}
	return r.proto(key, target), nil
}
