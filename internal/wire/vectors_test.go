package wire

import (
	"bytes"
	"encoding/hex"
	"errors"
	"slices"
	"strings"
	"testing"
)

// spec turns the notation of the spec's section 5 (hex bytes and "quoted" ASCII) into bytes.
func spec(t testing.TB, s string) []byte {
	t.Helper()
	var out []byte
	for len(s) > 0 {
		s = strings.TrimLeft(s, " \n\t")
		if s == "" {
			break
		}
		if s[0] == '"' {
			end := strings.IndexByte(s[1:], '"')
			if end < 0 {
				t.Fatalf("unterminated string in vector")
			}
			out = append(out, s[1:1+end]...)
			s = s[end+2:]
			continue
		}
		b, err := hex.DecodeString(s[:2])
		if err != nil {
			t.Fatalf("bad hex %q in vector", s[:2])
		}
		out = append(out, b...)
		s = s[2:]
	}
	return out
}

// Client → server `capabilities` with redirect target `target-a` (spec section 5).
const vecClientCapabilities = `
1c 00 00 01 00 01 01 82  a1 50 "contentencodings" 81 48 "identity"
43 00 00 01 00 01 00 11  a2 44 "name" 4c "capabilities" 48 "redirect"
                         a2 46 "hashes" 82 46 "sha256" 44 "sha1" 47 "targets" 81 48 "target-a"`

// The redirect section of the server's capabilities map (spec section 5), as a map entry.
const vecRedirectEntry = `
48 "redirect" a2 46 "hashes" 82 46 "sha256" 44 "sha1" 47 "targets" 81
  a5 44 "name" 48 "target-a" 48 "protocol" 44 "http" 4b "snirequired" f4
     4b "tlsversions" 82 43 "1.2" 43 "1.3" 44 "uris" 81 53 "http://example.com/"`

var vecTargetA = RedirectTarget{Name: "target-a", Protocol: "http", SNIRequired: new(bool),
	TLSVersions: []string{"1.2", "1.3"}, URIs: []string{"http://example.com/"}}

func TestSpecVectorClientRequestEncodes(t *testing.T) {
	var buf bytes.Buffer
	w := NewRequestWriter(&buf)
	if err := w.WriteSettings(EncodingIdentity); err != nil {
		t.Fatal(err)
	}
	req := &CommandRequest{RequestID: 1, Name: "capabilities",
		Redirect: &RedirectRequest{Targets: []string{"target-a"}, Hashes: []string{"sha256", "sha1"}}}
	if err := w.WriteCommand(req); err != nil {
		t.Fatal(err)
	}
	if want := spec(t, vecClientCapabilities); !bytes.Equal(buf.Bytes(), want) {
		t.Fatalf("encoded request\n got %x\nwant %x", buf.Bytes(), want)
	}
}

func TestSpecVectorClientRequestDecodes(t *testing.T) {
	rs, err := ReadRequest(bytes.NewReader(spec(t, vecClientCapabilities)), ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(rs.ContentEncodings, ","); got != "identity" {
		t.Errorf("contentencodings = %q", got)
	}
	if len(rs.Commands) != 1 {
		t.Fatalf("got %d commands", len(rs.Commands))
	}
	c := rs.Commands[0]
	if c.Name != "capabilities" || c.RequestID != 1 || c.StreamID != 1 || c.Args != nil {
		t.Errorf("command = %+v", c)
	}
	if c.Redirect == nil || strings.Join(c.Redirect.Targets, ",") != "target-a" ||
		strings.Join(c.Redirect.Hashes, ",") != "sha256,sha1" {
		t.Errorf("redirect = %+v", c.Redirect)
	}
}

func TestSpecVectorServerResponseFrames(t *testing.T) {
	caps := Map{"commands": Map{}, "redirect": RedirectSection{Hashes: DefaultHashes, Targets: []RedirectTarget{vecTargetA}}}
	var buf bytes.Buffer
	rw := NewResponseWriter(&buf, DefaultMaxPayload)
	if err := rw.WriteOK(1, caps); err != nil {
		t.Fatal(err)
	}
	capsBytes, err := Marshal(caps)
	if err != nil {
		t.Fatal(err)
	}
	want := spec(t, `
09 00 00 01 00 02 01 92  48 "identity"
0b 00 00 01 00 02 04 31  a1 46 "status" 42 "ok"`)
	n := len(capsBytes)
	want = append(want, byte(n), byte(n>>8), byte(n>>16), 0x01, 0x00, 0x02, 0x04, 0x31)
	want = append(want, capsBytes...)
	want = append(want, spec(t, `00 00 00 01 00 02 00 32`)...)
	if !bytes.Equal(buf.Bytes(), want) {
		t.Fatalf("response\n got %x\nwant %x", buf.Bytes(), want)
	}
	// And the capabilities map holds the redirect entry exactly as the spec shows it.
	if !bytes.Contains(capsBytes, spec(t, vecRedirectEntry)) {
		t.Fatalf("capabilities %x lack the spec's redirect entry", capsBytes)
	}
}

func TestSpecVectorRedirectSectionDecodes(t *testing.T) {
	caps := append([]byte{0xa1}, spec(t, vecRedirectEntry)...)
	s, err := ReadRedirect(caps)
	if err != nil {
		t.Fatal(err)
	}
	if s == nil || len(s.Targets) != 1 {
		t.Fatalf("section = %+v", s)
	}
	got := s.Targets[0]
	if got.Name != "target-a" || got.Protocol != "http" || got.SNIRequired == nil || *got.SNIRequired ||
		strings.Join(got.TLSVersions, ",") != "1.2,1.3" || strings.Join(got.URIs, ",") != "http://example.com/" {
		t.Errorf("target = %+v", got)
	}
	if strings.Join(s.Hashes, ",") != "sha256,sha1" {
		t.Errorf("hashes = %v", s.Hashes)
	}
	// Re-encoding gives the same bytes.
	again, err := RewriteRedirect(caps, s)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again, caps) {
		t.Fatalf("re-encoded\n got %x\nwant %x", again, caps)
	}
}

// The stored redirect object for manifestdata: {totalitems: 1} then a node with two null parents.
func TestSpecVectorManifestObject(t *testing.T) {
	node := strings.Repeat("\x11", 20)
	null := strings.Repeat("\x00", 20)
	var body []byte
	for _, v := range []any{Map{"totalitems": 1}, Map{"node": node, "parents": []any{null, null}}} {
		b, err := Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		body = append(body, b...)
	}
	if len(body) != 91 {
		t.Fatalf("object is %d bytes, spec says 91", len(body))
	}
	want := spec(t, `a1 4a "totalitems" 01 a2 44 "node" 54`)
	want = append(want, node...)
	want = append(want, spec(t, `47 "parents" 82 54`)...)
	want = append(want, null...)
	want = append(want, 0x54)
	want = append(want, null...)
	if !bytes.Equal(body, want) {
		t.Fatalf("object\n got %x\nwant %x", body, want)
	}
	objs, err := DecodeObjects(body)
	if err != nil || len(objs) != 2 {
		t.Fatalf("decode: %v, %d objects", err, len(objs))
	}
	m := objs[1].(map[string]any)
	if m["node"] != node || len(m["parents"].([]any)) != 2 {
		t.Errorf("decoded %#v", m)
	}
}

// Mercurial writes only the keys a target sets: a target without SNI or TLS settings is
// {name, protocol, uris} (from test-wireproto-content-redirects.t).
func TestRedirectTargetOmitsUnsetKeys(t *testing.T) {
	b := mustMarshal(t, RedirectTarget{Name: "target-a", Protocol: "http", URIs: []string{"http://example.com/"}})
	want := spec(t, `a3 44 "name" 48 "target-a" 48 "protocol" 44 "http" 44 "uris" 81 53 "http://example.com/"`)
	if !bytes.Equal(b, want) {
		t.Fatalf("got %x\nwant %x", b, want)
	}
}

// A redirect response as the real client needs it (spec sections 2 and 6): stream settings, then
// the whole status map in one command-response frame whose flags are EOS (0x32: type 3, flag 2),
// with the encoded stream flag, and nothing after it.
const vecRedirectResponse = `
09 00 00 01 00 02 01 92  48 "identity"
47 00 00 01 00 02 04 32  a2 48 "location" a2 49 "mediatype" 58 1a "application/mercurial-cbor"
                            43 "url" 41 "u" 46 "status" 48 "redirect"`

func TestRedirectIsOneFrameCarryingEOS(t *testing.T) {
	var buf bytes.Buffer
	if err := NewResponseWriter(&buf, DefaultMaxPayload).WriteRedirect(1, &Location{URL: "u", MediaType: MediaTypeCBOR}); err != nil {
		t.Fatal(err)
	}
	want := spec(t, vecRedirectResponse)
	if !bytes.Equal(buf.Bytes(), want) {
		t.Fatalf("redirect response\n got %x\nwant %x", buf.Bytes(), want)
	}
}

// A prepared redirect is the spec's vector with the request id set, for any id (both frames carry
// it), and equals WriteRedirect's bytes for a location with size and digests.
func TestPreparedRedirectIsWriteRedirectsBytes(t *testing.T) {
	p, err := PrepareRedirect(&Location{URL: "u", MediaType: MediaTypeCBOR}, DefaultMaxPayload)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := p.AppendTo(nil, 1), spec(t, vecRedirectResponse); !bytes.Equal(got, want) {
		t.Fatalf("prepared redirect\n got %x\nwant %x", got, want)
	}
	size := uint64(1 << 20)
	loc := &Location{URL: "https://example.com/o", MediaType: MediaTypeCBOR, Size: &size,
		FullHashes: [][]string{{"sha256", strings.Repeat("\x01", 32)}, {"sha1", strings.Repeat("\x02", 20)}}}
	p, err = PrepareRedirect(loc, DefaultMaxPayload)
	if err != nil {
		t.Fatal(err)
	}
	prefix := []byte("kept")
	for _, id := range []uint16{0, 1, 255, 256, 0xbeef, 0xffff} {
		var buf bytes.Buffer
		if err := NewResponseWriter(&buf, DefaultMaxPayload).WriteRedirect(id, loc); err != nil {
			t.Fatal(err)
		}
		got := p.AppendTo(slices.Clone(prefix), id)
		if !bytes.Equal(got[:len(prefix)], prefix) || !bytes.Equal(got[len(prefix):], buf.Bytes()) || p.Len() != buf.Len() {
			t.Fatalf("request id %d: prepared\n got %x\nwant %x", id, got[len(prefix):], buf.Bytes())
		}
	}
	if _, err := PrepareRedirect(&Location{URL: strings.Repeat("u", 200), MediaType: MediaTypeCBOR}, 100); !errors.Is(err, ErrRedirectTooLarge) {
		t.Fatalf("a redirect too large for a frame was prepared: %v", err)
	}
}

func TestRedirectTooLargeForOneFrameIsRefused(t *testing.T) {
	var buf bytes.Buffer
	err := NewResponseWriter(&buf, 100).WriteRedirect(1, &Location{URL: strings.Repeat("u", 200), MediaType: MediaTypeCBOR})
	if !errors.Is(err, ErrRedirectTooLarge) || buf.Len() != 0 {
		t.Fatalf("err = %v, wrote %d bytes", err, buf.Len())
	}
}
