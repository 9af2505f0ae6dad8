package wire

import (
	"bytes"
	"errors"
	"io"
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
		ErrBadCBOR, ErrBadValue, ErrUnsupportedEncoding, ErrIncomplete} {
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
