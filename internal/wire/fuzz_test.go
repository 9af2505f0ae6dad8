package wire

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

// FuzzReadFrames feeds arbitrary bytes to the frame reader and the request assembler. Any input
// must give frames or an error wrapping one of the package's sentinels; a request that assembles
// must re-encode and assemble again to the same commands.
func FuzzReadFrames(f *testing.F) {
	f.Add(spec(f, vecClientCapabilities))
	f.Add([]byte{1, 0, 0, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		rs, err := ReadRequest(bytes.NewReader(data), ReaderOptions{MaxTotal: 1 << 20})
		if err != nil {
			if !isPackageError(err) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		var buf bytes.Buffer
		w := NewRequestWriter(&buf)
		for _, c := range rs.Commands {
			if err := w.WriteCommand(c); err != nil {
				t.Fatalf("re-encode: %v", err)
			}
		}
		again, err := ReadRequest(&buf, ReaderOptions{MaxTotal: -1})
		if err != nil {
			t.Fatalf("re-encoded request does not read: %v", err)
		}
		if len(again.Commands) != len(rs.Commands) {
			t.Fatalf("%d commands became %d", len(rs.Commands), len(again.Commands))
		}
		for i, c := range again.Commands {
			if c.Name != rs.Commands[i].Name || !bytes.Equal(c.Data, rs.Commands[i].Data) {
				t.Fatalf("command %d changed", i)
			}
		}
	})
}

// FuzzDecodeCommandRequest decodes arbitrary command-request payloads.
func FuzzDecodeCommandRequest(f *testing.F) {
	f.Add(spec(f, vecClientCapabilities)[HeaderSize+28+HeaderSize:])
	f.Add(mustMarshal(f, Map{"name": "manifestdata", "args": Map{"nodes": []any{"0123456789abcdefghij"}, "tree": "", "fields": Set("parents", "revision")}}))
	f.Fuzz(func(t *testing.T, payload []byte) {
		req, err := DecodeCommandRequest(payload)
		if err != nil {
			if !isPackageError(err) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		b, err := EncodeCommandRequest(req)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		again, err := DecodeCommandRequest(b)
		if err != nil || again.Name != req.Name || (again.Redirect == nil) != (req.Redirect == nil) {
			t.Fatalf("round trip changed the request: %v", err)
		}
		if _, err := Canonical(req.Args); err != nil {
			t.Fatalf("decoded args do not encode canonically: %v", err)
		}
	})
}

// FuzzRewriteRedirect rewrites arbitrary capabilities maps; whatever it accepts, the result must
// carry exactly the new section.
func FuzzRewriteRedirect(f *testing.F) {
	f.Add(append([]byte{0xa1}, spec(f, vecRedirectEntry)...))
	f.Add(mustMarshal(f, Map{"apibase": "api/", "apis": Map{APIVersion: Map{"commands": Map{}}}, "v1capabilities": "batch"}))
	section := &RedirectSection{Hashes: DefaultHashes, Targets: []RedirectTarget{vecTargetA}}
	f.Fuzz(func(t *testing.T, caps []byte) {
		out, err := RewriteRedirect(caps, section)
		if err != nil {
			if !isPackageError(err) {
				t.Fatalf("untyped error: %v", err)
			}
		} else {
			got, err := ReadRedirect(out)
			if err != nil || got == nil || len(got.Targets) != 1 || got.Targets[0].Name != "target-a" {
				t.Fatalf("rewritten map has section %+v, %v", got, err)
			}
		}
		if _, err := RewriteHandshake(caps, section); err != nil && !isPackageError(err) {
			t.Fatalf("untyped handshake error: %v", err)
		}
	})
}

func isPackageError(err error) bool {
	for _, s := range []error{ErrTruncated, ErrPayloadTooLarge, ErrRequestTooLarge, ErrStreamParity,
		ErrStreamNotBegun, ErrUnknownFrameType, ErrUnexpectedFrame, ErrBadFlags, ErrContinuation,
		ErrBadCBOR, ErrBadValue, ErrUnsupportedEncoding, ErrIncomplete, ErrBadEncoding, ErrDecodeLimit} {
		if errors.Is(err, s) {
			return true
		}
	}
	return errors.Is(err, io.ErrUnexpectedEOF)
}

// FuzzReadResponse reads arbitrary server output as a client (and the agent, reading its origin)
// does: a status, then object bytes, or an error wrapping a sentinel.
func FuzzReadResponse(f *testing.F) {
	var ok, redirect bytes.Buffer
	NewResponseWriter(&ok, 100).WriteOK(1, Map{"totalitems": 1}, Map{"node": "n"})
	size := uint64(3)
	NewResponseWriter(&redirect, DefaultMaxPayload).WriteRedirect(1, &Location{URL: "u", MediaType: MediaTypeCBOR, Size: &size})
	f.Add(ok.Bytes())
	f.Add(redirect.Bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ReadResponse(bytes.NewReader(data), 1, ReaderOptions{})
		if err != nil {
			if !isPackageError(err) && !errors.Is(err, ErrServerError) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		if r.Status() == nil || r.Status().Status == "" {
			t.Fatal("response without a status")
		}
		if _, err := io.ReadAll(r); err != nil && !isPackageError(err) && !errors.Is(err, ErrServerError) {
			t.Fatalf("untyped error reading objects: %v", err)
		}
	})
}

// FuzzReadEncodedResponse reads arbitrary server output, seeded with Mercurial's own encoded
// responses: a status and object bytes, or an error wrapping a sentinel; never more decoded
// bytes than the limits allow.
func FuzzReadEncodedResponse(f *testing.F) {
	for _, name := range []string{"zstd8mb-small", "zlib-small", "identity-small", "offer-all"} {
		f.Add(readVector(f, name+".frames"))
	}
	limits := DecodeLimits{MaxDecoded: 4 << 20, MaxRatio: 64, RatioFloor: 1 << 20}
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ReadResponse(bytes.NewReader(data), 1, ReaderOptions{Decode: limits})
		if err != nil {
			if !isPackageError(err) && !errors.Is(err, ErrServerError) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		defer r.Close()
		n, err := io.Copy(io.Discard, r)
		if err != nil && !isPackageError(err) && !errors.Is(err, ErrServerError) {
			t.Fatalf("untyped error reading objects: %v", err)
		}
		if n > limits.MaxDecoded+decodeChunk {
			t.Fatalf("%d object bytes, limit %d", n, limits.MaxDecoded)
		}
	})
}

// FuzzStreamDecoder feeds arbitrary bytes, cut into frame payloads at arbitrary points, to the
// zlib and zstd-8mb decoders: no panic, typed errors, bounded output.
func FuzzStreamDecoder(f *testing.F) {
	for _, name := range []string{"zstd8mb-small", "zlib-small"} {
		frames := readVector(f, name+".frames")
		fr := NewReader(bytes.NewReader(frames), ReaderOptions{Side: ClientSide, MaxTotal: -1})
		var stream []byte
		for {
			fm, err := fr.Next()
			if err != nil {
				break
			}
			if fm.StreamFlags&StreamEncoded != 0 {
				stream = append(stream, fm.Payload...)
			}
		}
		sel := byte(0)
		if strings.HasPrefix(name, "zstd") {
			sel = 1
		}
		f.Add(sel, uint16(7), stream)
		f.Add(sel, uint16(1), stream)
	}
	f.Fuzz(func(t *testing.T, sel byte, cut uint16, stream []byte) {
		name := EncodingZlib
		if sel&1 == 1 {
			name = EncodingZstd8MB
		}
		limits := DecodeLimits{MaxDecoded: 4 << 20}
		d, err := newStreamDecoder(name, limits)
		if err != nil {
			t.Fatal(err)
		}
		defer d.close()
		step := int(cut)%4096 + 1
		var n int64
		for len(stream) > 0 {
			k := min(step, len(stream))
			err := d.feed(stream[:k], func(p []byte) error {
				if len(p) > decodeChunk {
					t.Fatalf("piece of %d bytes", len(p))
				}
				n += int64(len(p))
				return nil
			})
			if err != nil {
				if !errors.Is(err, ErrBadEncoding) && !errors.Is(err, ErrDecodeLimit) {
					t.Fatalf("untyped error: %v", err)
				}
				return
			}
			stream = stream[k:]
		}
		if n > limits.MaxDecoded+decodeChunk {
			t.Fatalf("%d bytes decoded, limit %d", n, limits.MaxDecoded)
		}
	})
}

// FuzzEncodedRoundTrip compresses arbitrary data as Mercurial's encoders do (flushes at
// arbitrary points, one context) and checks the decoder gives it back, frame by frame.
func FuzzEncodedRoundTrip(f *testing.F) {
	f.Add(byte(0), []byte("{status: ok} and some objects"), uint16(3))
	f.Add(byte(1), bytes.Repeat([]byte("abcdefgh"), 5000), uint16(1000))
	f.Fuzz(func(t *testing.T, sel byte, data []byte, cut uint16) {
		name, comp := EncodingZlib, zlibComp
		if sel&1 == 1 {
			name, comp = EncodingZstd8MB, zstdComp(t)
		}
		var enc bytes.Buffer
		c := comp(&enc)
		var payloads [][]byte
		step := int(cut)%1024 + 1
		for rest := data; ; {
			k := min(step, len(rest))
			c.Write(rest[:k])
			if sel&2 != 0 || len(rest) == k {
				if err := c.Flush(); err != nil {
					t.Fatal(err)
				}
			}
			payloads = append(payloads, bytes.Clone(enc.Bytes()))
			enc.Reset()
			rest = rest[k:]
			if len(rest) == 0 {
				break
			}
		}
		d, err := newStreamDecoder(name, DecodeLimits{})
		if err != nil {
			t.Fatal(err)
		}
		defer d.close()
		var got []byte
		for _, p := range payloads {
			if err := d.feed(p, func(b []byte) error { got = append(got, b...); return nil }); err != nil {
				t.Fatal(err)
			}
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("%s: %d bytes back, want %d", name, len(got), len(data))
		}
	})
}
