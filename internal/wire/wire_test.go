package wire

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

func frameBytes(fs ...Frame) []byte {
	var b []byte
	for _, f := range fs {
		b = AppendFrame(b, f)
	}
	return b
}

func mustMarshal(t testing.TB, v any) []byte {
	t.Helper()
	b, err := Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestHeaderRoundTrip(t *testing.T) {
	f := Frame{RequestID: 0x1234, StreamID: 7, StreamFlags: StreamBegin | StreamEncoded, Type: TypeCommandData,
		Flags: FlagDataEOS, Payload: bytes.Repeat([]byte{9}, 70000)}
	b := AppendFrame(nil, f)
	h, err := ParseHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	if h.Length != 70000 || h.RequestID != 0x1234 || h.StreamID != 7 || h.StreamFlags != 5 || h.Type != TypeCommandData || h.Flags != 2 {
		t.Fatalf("header = %+v", h)
	}
	r := NewReader(bytes.NewReader(b), ReaderOptions{MaxPayload: 1 << 20})
	got, err := r.Next()
	if err != nil || !bytes.Equal(got.Payload, f.Payload) || !bytes.Equal(r.Raw(), b) {
		t.Fatalf("read back: %v", err)
	}
	if _, err := r.Next(); err != io.EOF {
		t.Fatalf("after last frame: %v, want io.EOF", err)
	}
}

func TestWriterSplitsAtMaximum(t *testing.T) {
	var buf bytes.Buffer
	rw := NewResponseWriter(&buf, 10)
	data := []byte("0123456789abcdefghijXYZ")
	if err := rw.WriteData(3, data); err != nil {
		t.Fatal(err)
	}
	r := NewReader(&buf, ReaderOptions{Side: ClientSide, MaxPayload: 10})
	var got []byte
	var sizes []int
	for {
		f, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if f.Flags != FlagResponseContinuation {
			t.Errorf("frame flags 0x%x", f.Flags)
		}
		got = append(got, f.Payload...)
		sizes = append(sizes, len(f.Payload))
	}
	if !bytes.Equal(got, data) || len(sizes) != 3 || sizes[0] != 10 || sizes[2] != 3 {
		t.Fatalf("split into %v, %q", sizes, got)
	}
}

func TestLargeCommandRequestSpansFrames(t *testing.T) {
	nodes := make([]any, 3000)
	for i := range nodes {
		nodes[i] = strings.Repeat(string(rune('a'+i%26)), 20)
	}
	var buf bytes.Buffer
	w := NewRequestWriter(&buf)
	req := &CommandRequest{RequestID: 5, Name: "manifestdata", Args: map[string]any{"nodes": nodes, "tree": ""},
		Data: bytes.Repeat([]byte("d"), 70000), Redirect: &RedirectRequest{Targets: []string{"a", "b"}, Hashes: []string{"sha1"}}}
	if err := w.WriteSettings("zstd-8mb", "identity"); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteCommand(req); err != nil {
		t.Fatal(err)
	}
	rs, err := ReadRequest(&buf, ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rs.Commands) != 1 {
		t.Fatalf("%d commands", len(rs.Commands))
	}
	got := rs.Commands[0]
	if got.Name != "manifestdata" || len(got.Args["nodes"].([]any)) != 3000 || len(got.Data) != 70000 || !got.HasData {
		t.Fatalf("got %s with %d nodes, %d data bytes", got.Name, len(got.Args["nodes"].([]any)), len(got.Data))
	}
	if strings.Join(rs.ContentEncodings, ",") != "zstd-8mb,identity" {
		t.Errorf("encodings %v", rs.ContentEncodings)
	}
}

func TestMalformedRequestsAreTypedErrors(t *testing.T) {
	settings := Frame{RequestID: 1, StreamID: 1, StreamFlags: StreamBegin, Type: TypeSenderProtocolSettings,
		Flags: FlagSettingsEOS, Payload: []byte{0xa1, 0x50, 'c', 'o', 'n', 't', 'e', 'n', 't', 'e', 'n', 'c', 'o', 'd', 'i', 'n', 'g', 's', 0x81, 0x48, 'i', 'd', 'e', 'n', 't', 'i', 't', 'y'}}
	okReq := func(payload []byte) Frame {
		return Frame{RequestID: 1, StreamID: 1, StreamFlags: StreamBegin, Type: TypeCommandRequest, Flags: FlagRequestNew, Payload: payload}
	}
	name := []byte{0xa1, 0x44, 'n', 'a', 'm', 'e', 0x43, 'f', 'o', 'o'}
	nested := bytes.Repeat([]byte{0x81}, 200)
	nested = append(nested, 0x01)
	cases := []struct {
		name string
		in   []byte
		want error
	}{
		{"short header", []byte{1, 0, 0, 1}, ErrTruncated},
		{"short payload", frameBytes(okReq(name))[:12], ErrTruncated},
		{"length past limit", []byte{0x01, 0x80, 0x00, 1, 0, 1, 1, 0x11}, ErrPayloadTooLarge},
		{"wrong stream parity", frameBytes(Frame{RequestID: 1, StreamID: 2, StreamFlags: StreamBegin, Type: TypeCommandRequest, Flags: FlagRequestNew, Payload: name}), ErrStreamParity},
		{"no begin-stream", frameBytes(Frame{RequestID: 1, StreamID: 1, Type: TypeCommandRequest, Flags: FlagRequestNew, Payload: name}), ErrStreamNotBegun},
		{"continuation without new", frameBytes(Frame{RequestID: 1, StreamID: 1, StreamFlags: StreamBegin, Type: TypeCommandRequest, Flags: FlagRequestContinuation, Payload: name}), ErrContinuation},
		{"new and continuation", frameBytes(Frame{RequestID: 1, StreamID: 1, StreamFlags: StreamBegin, Type: TypeCommandRequest, Flags: FlagRequestNew | FlagRequestContinuation, Payload: name}), ErrBadFlags},
		{"unknown frame type", frameBytes(Frame{RequestID: 1, StreamID: 1, StreamFlags: StreamBegin, Type: 0xc, Payload: name}), ErrUnknownFrameType},
		{"server frame type from client", frameBytes(Frame{RequestID: 1, StreamID: 1, StreamFlags: StreamBegin, Type: TypeCommandResponse, Flags: FlagResponseEOS}), ErrUnexpectedFrame},
		{"truncated CBOR", frameBytes(okReq(name[:6])), ErrIncomplete},
		{"not CBOR", frameBytes(okReq([]byte{0xff, 0xff})), ErrBadCBOR},
		{"trailing bytes", frameBytes(okReq(append(append([]byte{}, name...), 0x01))), ErrBadCBOR},
		{"name not bytes", frameBytes(okReq([]byte{0xa1, 0x44, 'n', 'a', 'm', 'e', 0x01})), ErrBadValue},
		{"payload not a map", frameBytes(okReq([]byte{0x83, 1, 2, 3})), ErrBadValue},
		{"missing name", frameBytes(okReq([]byte{0xa0})), ErrBadValue},
		{"unknown key", frameBytes(okReq([]byte{0xa2, 0x44, 'n', 'a', 'm', 'e', 0x41, 'x', 0x41, 'z', 0x01})), ErrBadValue},
		{"args not a map", frameBytes(okReq([]byte{0xa2, 0x44, 'a', 'r', 'g', 's', 0x01, 0x44, 'n', 'a', 'm', 'e', 0x41, 'x'})), ErrBadValue},
		{"redirect targets not a list", frameBytes(okReq(mustMarshal(t, Map{"name": "x", "redirect": Map{"targets": 3}}))), ErrBadValue},
		{"deeply nested", frameBytes(okReq(append([]byte{0xa2, 0x44, 'n', 'a', 'm', 'e', 0x41, 'x', 0x44, 'a', 'r', 'g', 's', 0xa1, 0x41, 'z'}, nested...))), ErrBadCBOR},
		{"more frames never come", frameBytes(Frame{RequestID: 1, StreamID: 1, StreamFlags: StreamBegin, Type: TypeCommandRequest, Flags: FlagRequestNew | FlagRequestMore, Payload: name[:3]}), ErrIncomplete},
		{"data never comes", frameBytes(Frame{RequestID: 1, StreamID: 1, StreamFlags: StreamBegin, Type: TypeCommandRequest, Flags: FlagRequestNew | FlagRequestHaveData, Payload: name}), ErrIncomplete},
		{"data without request", frameBytes(Frame{RequestID: 1, StreamID: 1, StreamFlags: StreamBegin, Type: TypeCommandData, Flags: FlagDataEOS}), ErrUnexpectedFrame},
		{"settings after command", frameBytes(okReq(name), Frame{RequestID: 1, StreamID: 1, Type: TypeSenderProtocolSettings, Flags: FlagSettingsEOS, Payload: settings.Payload}), ErrUnexpectedFrame},
		{"settings both flags", frameBytes(Frame{RequestID: 1, StreamID: 1, StreamFlags: StreamBegin, Type: TypeSenderProtocolSettings, Flags: 3, Payload: settings.Payload}), ErrBadFlags},
		{"settings wrong shape", frameBytes(Frame{RequestID: 1, StreamID: 1, StreamFlags: StreamBegin, Type: TypeSenderProtocolSettings, Flags: FlagSettingsEOS, Payload: []byte{0xa1, 0x41, 'x', 0x01}}), ErrBadValue},
		{"request id reused", frameBytes(okReq(name), Frame{RequestID: 1, StreamID: 1, Type: TypeCommandRequest, Flags: FlagRequestNew, Payload: name}), ErrUnexpectedFrame},
		{"client stream encoding", frameBytes(Frame{RequestID: 1, StreamID: 1, StreamFlags: StreamBegin, Type: TypeStreamSettings, Flags: FlagSettingsEOS, Payload: []byte{0x44, 'z', 'l', 'i', 'b'}}), ErrUnsupportedEncoding},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ReadRequest(bytes.NewReader(c.in), ReaderOptions{MaxPayload: 0x7fff})
			if !errors.Is(err, c.want) {
				t.Fatalf("err = %v, want %v", err, c.want)
			}
		})
	}
}

func TestRequestTotalLimit(t *testing.T) {
	var buf bytes.Buffer
	w := NewRequestWriter(&buf)
	if err := w.WriteCommand(&CommandRequest{RequestID: 1, Name: "x", Data: make([]byte, 100000)}); err != nil {
		t.Fatal(err)
	}
	_, err := ReadRequest(&buf, ReaderOptions{MaxTotal: 50000})
	if !errors.Is(err, ErrRequestTooLarge) {
		t.Fatalf("err = %v", err)
	}
}

func TestResponseRoundTrips(t *testing.T) {
	size := uint64(91)
	loc := &Location{URL: "https://cdn.example/x", MediaType: MediaTypeCBOR, Size: &size,
		FullHashes: [][]string{{"sha256", strings.Repeat("\x01", 32)}, {"sha1", strings.Repeat("\x02", 20)}}}
	cases := []struct {
		name  string
		write func(*ResponseWriter) error
		check func(*testing.T, *Response, error)
	}{
		{"ok with objects", func(w *ResponseWriter) error {
			return w.WriteOK(1, Map{"totalitems": 2}, Map{"node": "n1"}, Map{"node": strings.Repeat("x", 100000)})
		}, func(t *testing.T, r *Response, err error) {
			if err != nil || r.Status().Status != StatusOK {
				t.Fatalf("status %v, %v", r, err)
			}
			body, err := io.ReadAll(r)
			if err != nil {
				t.Fatal(err)
			}
			objs, err := DecodeObjects(body)
			if err != nil || len(objs) != 3 {
				t.Fatalf("%d objects, %v", len(objs), err)
			}
		}},
		{"redirect", func(w *ResponseWriter) error { return w.WriteRedirect(1, loc) },
			func(t *testing.T, r *Response, err error) {
				if err != nil {
					t.Fatal(err)
				}
				l := r.Status().Location
				if r.Status().Status != StatusRedirect || l == nil || l.URL != loc.URL || *l.Size != 91 ||
					!bytes.Equal(l.FullHash("sha1"), bytes.Repeat([]byte{2}, 20)) {
					t.Fatalf("status %+v", r.Status())
				}
				if b, err := io.ReadAll(r); err != nil || len(b) != 0 {
					t.Fatalf("redirect carried %d bytes, %v", len(b), err)
				}
			}},
		{"command error", func(w *ResponseWriter) error { return w.WriteCommandError(1, "unknown node") },
			func(t *testing.T, r *Response, err error) {
				if err != nil || r.Status().Status != StatusError || r.Status().Error.Message != "unknown node" {
					t.Fatalf("status %+v %v", r, err)
				}
			}},
		{"error frame", func(w *ResponseWriter) error { return w.WriteErrorFrame(1, "protocol", "bad frame") },
			func(t *testing.T, r *Response, err error) {
				if !errors.Is(err, ErrServerError) || !strings.Contains(err.Error(), "bad frame") {
					t.Fatalf("err = %v", err)
				}
			}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := c.write(NewResponseWriter(&buf, 1000)); err != nil {
				t.Fatal(err)
			}
			r, err := ReadResponse(&buf, 1, ReaderOptions{})
			c.check(t, r, err)
		})
	}
}

func TestRedirectLocationBytesMatchMercurial(t *testing.T) {
	// {location: {mediatype, url}, status: redirect}, keys in Mercurial's order.
	b := mustMarshal(t, Status{Status: StatusRedirect, Location: &Location{URL: "u", MediaType: "m"}})
	want := spec(t, `a2 48 "location" a2 49 "mediatype" 41 "m" 43 "url" 41 "u" 46 "status" 48 "redirect"`)
	if !bytes.Equal(b, want) {
		t.Fatalf("got %x\nwant %x", b, want)
	}
}

func TestResponseTruncatedIsIncomplete(t *testing.T) {
	var buf bytes.Buffer
	w := NewResponseWriter(&buf, 1000)
	if err := w.WriteStreamSettings(1, EncodingIdentity); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteValue(1, Status{Status: StatusOK}); err != nil {
		t.Fatal(err)
	}
	r, err := ReadResponse(&buf, 1, ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(r); !errors.Is(err, ErrIncomplete) {
		t.Fatalf("err = %v", err)
	}
}

func TestRewriteHandshakeKeepsTheRest(t *testing.T) {
	v2 := Map{"commands": Map{"heads": Map{"args": Map{}, "permissions": []any{"pull"}}},
		"framingmediatypes": []any{MediaTypeFraming}, "pathfilterprefixes": Set("path:", "rootfilesin:"),
		"rawrepoformats": []any{"generaldelta", "revlogv1"}}
	hs := mustMarshal(t, Map{"apibase": "api/", "apis": Map{APIVersion: v2}, "v1capabilities": "batch branchmap"})
	section := &RedirectSection{Hashes: DefaultHashes, Targets: []RedirectTarget{vecTargetA}}
	out, err := RewriteHandshake(hs, section)
	if err != nil {
		t.Fatal(err)
	}
	v2["redirect"] = section
	want := mustMarshal(t, Map{"apibase": "api/", "apis": Map{APIVersion: v2}, "v1capabilities": "batch branchmap"})
	if !bytes.Equal(out, want) {
		t.Fatalf("rewritten handshake\n got %x\nwant %x", out, want)
	}
	// Removing targets removes the section, back to the original bytes.
	back, err := RewriteHandshake(out, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, hs) {
		t.Fatalf("removing the section did not restore the original")
	}
	// A handshake without the v2 API is returned as it is.
	plain := mustMarshal(t, Map{"v1capabilities": "batch"})
	if got, err := RewriteHandshake(plain, section); err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("plain handshake changed: %v", err)
	}
	for _, bad := range [][]byte{{0x01}, {0xa1, 0x44, 'a', 'p', 'i', 's', 0x01}, {0xbf}} {
		if _, err := RewriteHandshake(bad, section); err == nil {
			t.Errorf("RewriteHandshake(%x) succeeded", bad)
		}
	}
}
