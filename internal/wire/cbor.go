package wire

import (
	"fmt"
	"reflect"
	"sort"

	"github.com/fxamacker/cbor/v2"
)

// CBOR limits for values from the network.
const (
	maxNesting  = 32
	maxElements = 1 << 17
)

var (
	// encMode writes Go strings and struct field names as byte strings, as Mercurial does, and
	// keeps struct fields in declaration order: the structs below declare fields in Mercurial's
	// bytewise-lexical key order.
	encMode cbor.EncMode
	// canonicalMode is for hashing (content keys): a deterministic encoding of a decoded value.
	canonicalMode cbor.EncMode
	decMode       cbor.DecMode
	// strictMode decodes maps into structs refusing keys the struct does not name; names are
	// compared case-sensitively (the library otherwise also accepts "Name" for "name").
	strictMode cbor.DecMode
)

func init() {
	var err error
	encMode, err = cbor.EncOptions{
		Sort:        cbor.SortNone,
		String:      cbor.StringToByteString,
		FieldName:   cbor.FieldNameToByteString,
		IndefLength: cbor.IndefLengthForbidden,
	}.EncMode()
	if err != nil {
		panic(err)
	}
	canonicalMode, err = cbor.EncOptions{
		Sort:        cbor.SortCoreDeterministic,
		String:      cbor.StringToByteString,
		FieldName:   cbor.FieldNameToByteString,
		IndefLength: cbor.IndefLengthForbidden,
	}.EncMode()
	if err != nil {
		panic(err)
	}
	dec := cbor.DecOptions{
		DupMapKey:             cbor.DupMapKeyEnforcedAPF,
		MaxNestedLevels:       maxNesting,
		MaxArrayElements:      maxElements,
		MaxMapPairs:           maxElements,
		IndefLength:           cbor.IndefLengthAllowed, // Mercurial streams large byte strings indefinitely
		DefaultByteStringType: reflect.TypeOf(""),
		ByteStringToString:    cbor.ByteStringToStringAllowed,
		FieldNameByteString:   cbor.FieldNameByteStringAllowed,
		DefaultMapType:        reflect.TypeOf(map[string]any(nil)),
	}
	if decMode, err = dec.DecMode(); err != nil {
		panic(err)
	}
	dec.ExtraReturnErrors = cbor.ExtraDecErrorUnknownField
	dec.FieldNameMatching = cbor.FieldNameMatchingCaseSensitive
	if strictMode, err = dec.DecMode(); err != nil {
		panic(err)
	}
}

// Marshal encodes v the way Mercurial does: byte strings, maps with bytewise-lexically sorted keys
// (for Map and map[string]any values), structs in field order.
func Marshal(v any) ([]byte, error) { return encMode.Marshal(normalize(v)) }

// Unmarshal decodes exactly one CBOR value from data into v. Byte strings decode into Go strings
// when v asks for any; maps into map[string]any.
func Unmarshal(data []byte, v any) error {
	if err := decMode.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%w: %v", classify(err), err)
	}
	return nil
}

// unmarshalStrict is Unmarshal into a struct that refuses keys it does not name.
func unmarshalStrict(data []byte, v any) error {
	if err := strictMode.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%w: %w", classify(err), err)
	}
	return nil
}

// UnmarshalFirst decodes the first CBOR value in data into v and returns the rest. If data holds
// only part of a value, the error wraps ErrIncomplete.
func UnmarshalFirst(data []byte, v any) ([]byte, error) {
	rest, err := decMode.UnmarshalFirst(data, v)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", classify(err), err)
	}
	return rest, nil
}

// Canonical returns a deterministic encoding of v, for hashing.
func Canonical(v any) ([]byte, error) { return canonicalMode.Marshal(v) }

func classify(err error) error {
	switch err.(type) {
	case *cbor.UnmarshalTypeError, *cbor.DupMapKeyError, *cbor.UnknownFieldError:
		return ErrBadValue
	}
	if err.Error() == "unexpected EOF" || err.Error() == "EOF" {
		return ErrIncomplete
	}
	return ErrBadCBOR
}

// Map is a CBOR map with byte-string keys, encoded with keys in bytewise-lexical order, as
// Mercurial's cborutil does. (The library's deterministic modes order by encoded key, which puts
// short keys first; Mercurial's byte-identical output needs plain lexical order.)
type Map map[string]any

// MarshalCBOR implements cbor.Marshaler: the values are encoded by the library, the map around
// them by RawMap.
func (m Map) MarshalCBOR() ([]byte, error) {
	raw := make(RawMap, len(m))
	for k, v := range m {
		b, err := encMode.Marshal(normalize(v))
		if err != nil {
			return nil, fmt.Errorf("map key %q: %w", k, err)
		}
		raw[k] = b
	}
	return raw.MarshalCBOR()
}

// RawMap is a map whose values are already-encoded CBOR; it encodes with lexical key order and the
// values' bytes untouched.
type RawMap map[string]cbor.RawMessage

// MarshalCBOR implements cbor.Marshaler. Only the map's head is written here (RFC 8949 section
// 3); keys and values are the library's encoding.
func (m RawMap) MarshalCBOR() ([]byte, error) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	b := appendHead(nil, majorMap, uint64(len(m)))
	for _, k := range keys {
		kb, err := encMode.Marshal(k)
		if err != nil {
			return nil, err
		}
		b = append(b, kb...)
		b = append(b, m[k]...)
	}
	return b, nil
}

// appendHead writes a CBOR initial byte and argument (RFC 8949 section 3).
// majorMap is CBOR's major type of maps.
const majorMap = 5

func appendHead(b []byte, major byte, n uint64) []byte {
	m := major << 5
	switch {
	case n < 24:
		return append(b, m|byte(n))
	case n <= 0xff:
		return append(b, m|24, byte(n))
	case n <= 0xffff:
		return append(b, m|25, byte(n>>8), byte(n))
	case n <= 0xffffffff:
		return append(b, m|26, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
	}
	return append(b, m|27, byte(n>>56), byte(n>>48), byte(n>>40), byte(n>>32),
		byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
}

// normalize turns decoded generic maps into Map so that nested maps encode in Mercurial's order.
func normalize(v any) any {
	switch t := v.(type) {
	case map[string]any:
		m := make(Map, len(t))
		for k, x := range t {
			m[k] = normalize(x)
		}
		return m
	case Map:
		return t
	case []any:
		out := make([]any, len(t))
		for i, x := range t {
			out[i] = normalize(x)
		}
		return out
	case cbor.Tag:
		return cbor.Tag{Number: t.Number, Content: normalize(t.Content)}
	}
	return v
}

// Set is a CBOR finite set (tag 258 around an array), as Mercurial encodes Python sets.
func Set(items ...string) cbor.Tag {
	s := append([]string(nil), items...)
	sort.Strings(s)
	arr := make([]any, len(s))
	for i, x := range s {
		arr[i] = x
	}
	return cbor.Tag{Number: 258, Content: arr}
}

// RawMessage is an encoded CBOR value.
type RawMessage = cbor.RawMessage
