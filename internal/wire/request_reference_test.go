package wire

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// referenceDecodeCommandRequest is the decoder decodeCommandRequest replaced: the payload into a
// map of raw values, the name and arguments from it, the redirect map twice (its keys, then the
// struct). It is kept to check that the one-pass decoder gives the same answers.
func referenceDecodeCommandRequest(payload []byte) (*CommandRequest, error) {
	req := &CommandRequest{}
	var m map[string]RawMessage
	if err := Unmarshal(payload, &m); err != nil {
		return nil, err
	}
	for k := range m {
		if k != "name" && k != "args" && k != "redirect" {
			return nil, ErrBadValue
		}
	}
	raw, ok := m["name"]
	if !ok {
		return nil, ErrBadValue
	}
	if err := Unmarshal(raw, &req.Name); err != nil {
		return nil, err
	}
	if req.Name == "" {
		return nil, ErrBadValue
	}
	if raw, ok := m["args"]; ok {
		if err := Unmarshal(raw, &req.Args); err != nil {
			return nil, err
		}
		if req.Args == nil {
			return nil, ErrBadValue
		}
		req.RawArgs = raw
	}
	if raw, ok := m["redirect"]; ok {
		var keys map[string]RawMessage
		if err := Unmarshal(raw, &keys); err != nil {
			return nil, err
		}
		if keys == nil {
			return nil, ErrBadValue
		}
		for k := range keys {
			if k != "targets" && k != "hashes" {
				return nil, ErrBadValue
			}
		}
		var rr RedirectRequest
		if err := Unmarshal(raw, &rr); err != nil {
			return nil, err
		}
		if rr.Targets == nil {
			rr.Targets = []string{}
		}
		req.Redirect = &rr
	}
	return req, nil
}

// checkAgainstReference fails when the decoder and the reference disagree about payload. The one
// deliberate difference: a redirect value that is a tagged map is refused (the reference ignored
// the tag).
func checkAgainstReference(t *testing.T, payload []byte) {
	t.Helper()
	got, err := DecodeCommandRequest(payload)
	want, refErr := referenceDecodeCommandRequest(payload)
	switch {
	case err != nil && refErr != nil:
		return
	case err != nil:
		if raw, ok := redirectValue(payload); ok && len(raw) > 0 && raw[0]>>5 == 6 {
			return
		}
		t.Fatalf("refused what the reference accepts (%+v): %v", want, err)
	case refErr != nil:
		t.Fatalf("accepted what the reference refuses (%v): %+v", refErr, got)
	}
	if got.Name != want.Name || !reflect.DeepEqual(got.Args, want.Args) || !bytes.Equal(got.RawArgs, want.RawArgs) ||
		!reflect.DeepEqual(got.Redirect, want.Redirect) {
		t.Fatalf("decoded %+v, the reference %+v", got, want)
	}
}

func redirectValue(payload []byte) (RawMessage, bool) {
	var m map[string]RawMessage
	if Unmarshal(payload, &m) != nil {
		return nil, false
	}
	raw, ok := m["redirect"]
	return raw, ok
}

func TestDecodeCommandRequestMatchesReference(t *testing.T) {
	payloads := [][]byte{
		mustMarshal(t, Map{"name": "manifestdata", "args": Map{"nodes": []any{"0123456789abcdefghij"}, "tree": "", "fields": Set("parents", "revision")},
			"redirect": Map{"targets": []any{"a", "b"}, "hashes": []any{"sha256", "sha1"}}}),
		mustMarshal(t, Map{"name": "heads"}),
		mustMarshal(t, Map{"name": "x", "redirect": Map{"targets": []any{}}}),
		mustMarshal(t, Map{"name": "x", "redirect": Map{"Targets": []any{"a"}}}), // case differs: refused
		mustMarshal(t, Map{"Name": "x"}),
		mustMarshal(t, Map{"name": "x", "extra": 1}),
		mustMarshal(t, Map{"name": "x", "redirect": nil}),
		mustMarshal(t, Map{"name": "x", "redirect": []any{}}),
		mustMarshal(t, Map{"name": "x", "args": nil}),
		mustMarshal(t, Map{"name": "x", "args": []any{}}),
		mustMarshal(t, Map{"name": ""}),
		mustMarshal(t, Map{"name": nil}),
		mustMarshal(t, Map{"name": 7}),
		mustMarshal(t, Map{"name": "x", "redirect": Map{"targets": []any{1}}}),
		{0xa2, 0x44, 'n', 'a', 'm', 'e', 0x41, 'x', 0x44, 'n', 'a', 'm', 'e', 0x41, 'y'}, // duplicate key
		{0xa1, 0x01, 0x02}, // integer key
		{0xf6},             // null
		{0xa0},             // empty map
		{0xbf, 0x44, 'n', 'a', 'm', 'e', 0x41, 'x', 0xff}, // indefinite-length map
	}
	for _, p := range payloads {
		checkAgainstReference(t, p)
	}
}

// FuzzDecodeCommandRequestMatchesReference runs the comparison on arbitrary payloads.
func FuzzDecodeCommandRequestMatchesReference(f *testing.F) {
	f.Add(mustMarshal(f, Map{"name": "manifestdata", "args": Map{"nodes": []any{"0123456789abcdefghij"}, "tree": ""},
		"redirect": Map{"targets": []any{"a"}, "hashes": []any{"sha256"}}}))
	f.Add([]byte{0xbf, 0x44, 'n', 'a', 'm', 'e', 0x41, 'x', 0xff})
	f.Fuzz(func(t *testing.T, payload []byte) { checkAgainstReference(t, payload) })
}

// BenchmarkDecodeCommandRequest compares the one-pass decoder with the reference on a
// manifestdata request as Mercurial sends it during a clone.
func BenchmarkDecodeCommandRequest(b *testing.B) {
	nodes := make([]any, 100)
	for i := range nodes {
		nodes[i] = strings.Repeat(string(rune('a'+i%26)), 20)
	}
	for _, n := range []int{1, 100} {
		payload := mustMarshal(b, Map{"name": "manifestdata", "args": Map{"fields": Set("parents", "revision"), "haveparents": true, "nodes": nodes[:n], "tree": ""},
			"redirect": Map{"targets": []any{"us-gcs", "eu-gcs"}, "hashes": []any{"sha256", "sha1"}}})
		for _, impl := range []struct {
			name   string
			decode func([]byte) (*CommandRequest, error)
		}{{"one-pass", DecodeCommandRequest}, {"reference", referenceDecodeCommandRequest}} {
			b.Run(fmt.Sprintf("nodes=%d/%s", n, impl.name), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if _, err := impl.decode(payload); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// An unknown key is refused by name, in the request and in its redirect map.
func TestUnknownKeysAreNamed(t *testing.T) {
	for _, c := range []struct {
		payload Map
		key     string
	}{
		{Map{"name": "x", "extra": 1}, `"extra"`},
		{Map{"name": "x", "redirect": Map{"targets": []any{}, "Hashes": []any{}}}, `"Hashes"`},
	} {
		_, err := DecodeCommandRequest(mustMarshal(t, c.payload))
		if !errors.Is(err, ErrBadValue) || !strings.Contains(err.Error(), "unknown key "+c.key) {
			t.Errorf("%v: %v, want an error naming %s", c.payload, err, c.key)
		}
	}
}
