package wire

import (
	"bytes"
	"compress/zlib"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

func readVector(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "encoded", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The vectors in testdata/encoded come from Mercurial 5.6.1's own clientreactor and
// serverreactor (gen.py there): the server encodes its answer with the first encoding of its
// order the client offered.
var mercurialVectors = []struct {
	name      string
	offered   []string
	encoding  string
	requestID uint16 // of the last command
	objects   string
}{
	{"zstd8mb-small", []string{"zstd-8mb", "identity"}, "zstd-8mb", 1, "small"},
	{"zstd8mb-big", []string{"zstd-8mb", "identity"}, "zstd-8mb", 1, "big"},
	{"zstd8mb-two", []string{"zstd-8mb", "identity"}, "zstd-8mb", 3, "big"},
	{"zlib-small", []string{"zlib", "identity"}, "zlib", 1, "small"},
	{"zlib-big", []string{"zlib", "identity"}, "zlib", 1, "big"},
	{"zlib-two", []string{"zlib", "identity"}, "zlib", 3, "big"},
	{"identity-small", []string{"identity"}, "identity", 1, "small"},
	{"identity-big", []string{"identity"}, "identity", 1, "big"},
	{"identity-two", []string{"identity"}, "identity", 3, "big"},
	{"offer-all", []string{"zstd-8mb", "zlib", "identity"}, "zstd-8mb", 1, "small"},
}

// streamEncoding returns the name in the first stream-settings frame of a response.
func streamEncoding(t testing.TB, frames []byte) string {
	t.Helper()
	fr := NewReader(bytes.NewReader(frames), ReaderOptions{Side: ClientSide, MaxTotal: -1})
	for {
		f, err := fr.Next()
		if err != nil {
			t.Fatalf("no stream-settings frame: %v", err)
		}
		if f.Type == TypeStreamSettings {
			var enc string
			if _, err := UnmarshalFirst(f.Payload, &enc); err != nil {
				t.Fatal(err)
			}
			return enc
		}
	}
}

func TestMercurialEncodedResponsesDecodeToIdentityObjects(t *testing.T) {
	for _, v := range mercurialVectors {
		t.Run(v.name, func(t *testing.T) {
			frames := readVector(t, v.name+".frames")
			want := readVector(t, v.objects+".cbor")
			if got := streamEncoding(t, frames); got != v.encoding {
				t.Fatalf("Mercurial picked %q, want %q", got, v.encoding)
			}

			// As a client reads it.
			r, err := ReadResponse(bytes.NewReader(frames), v.requestID, ReaderOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if r.Status().Status != StatusOK {
				t.Fatalf("status %+v", r.Status())
			}
			got, err := io.ReadAll(r)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("decoded %d object bytes, want the identity answer's %d", len(got), len(want))
			}

			// As the agent's relay loop reads it: frame by frame, Add and AddFunc.
			for _, useFunc := range []bool{false, true} {
				fr := NewReader(bytes.NewReader(frames), ReaderOptions{Side: ClientSide, MaxPayload: MaxPayloadLimit, MaxTotal: -1})
				asm := NewResponseAssembler(v.requestID)
				var objects []byte
				for {
					f, err := fr.Next()
					if err == io.EOF {
						break
					}
					if err != nil {
						t.Fatal(err)
					}
					if useFunc {
						err = asm.AddFunc(f, func(p []byte) error {
							if len(p) > decodeChunk {
								return fmt.Errorf("piece of %d bytes", len(p))
							}
							objects = append(objects, p...)
							return nil
						})
					} else {
						var data []byte
						data, err = asm.Add(f)
						objects = append(objects, data...)
					}
					if err != nil {
						t.Fatalf("frame %s: %v", f, err)
					}
				}
				if !asm.Done() || asm.Status() == nil || asm.Status().Status != StatusOK {
					t.Fatalf("done=%v status=%+v", asm.Done(), asm.Status())
				}
				if !bytes.Equal(objects, want) || asm.ObjectBytes() != int64(len(want)) {
					t.Fatalf("AddFunc=%v: %d object bytes (counted %d), want %d", useFunc, len(objects), asm.ObjectBytes(), len(want))
				}
			}
		})
	}
}

// In a multi-command response the first command's answer is decoded too, and the second's
// decoder state continues from it: one compression context per stream.
func TestEncodedStreamContinuesAcrossCommands(t *testing.T) {
	for _, name := range []string{"zstd8mb-two", "zlib-two"} {
		frames := readVector(t, name+".frames")
		for id, objects := range map[uint16]string{1: "small", 3: "big"} {
			r, err := ReadResponse(bytes.NewReader(frames), id, ReaderOptions{})
			if err != nil {
				t.Fatalf("%s request %d: %v", name, id, err)
			}
			got, err := io.ReadAll(r)
			if err != nil {
				t.Fatalf("%s request %d: %v", name, id, err)
			}
			if want := readVector(t, objects+".cbor"); !bytes.Equal(got, want) {
				t.Fatalf("%s request %d: %d bytes, want %d", name, id, len(got), len(want))
			}
		}
	}
}

// The request side: Mercurial's client request bodies read back with their offers, and
// RequestWriter writes the same bytes for the same offer and commands.
func TestMercurialRequestsWithEncodingOffers(t *testing.T) {
	for _, v := range mercurialVectors {
		t.Run(v.name, func(t *testing.T) {
			body := readVector(t, v.name+".request")
			rs, err := ReadRequest(bytes.NewReader(body), ReaderOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(rs.ContentEncodings, v.offered) {
				t.Fatalf("contentencodings %q, want %q", rs.ContentEncodings, v.offered)
			}
			if !slices.Equal(UpstreamEncodings(rs.ContentEncodings), v.offered) {
				t.Fatalf("UpstreamEncodings(%q) = %q", rs.ContentEncodings, UpstreamEncodings(rs.ContentEncodings))
			}
			var buf bytes.Buffer
			w := NewRequestWriter(&buf)
			if err := w.WriteSettings(UpstreamEncodings(rs.ContentEncodings)...); err != nil {
				t.Fatal(err)
			}
			for _, c := range rs.Commands {
				if err := w.WriteCommand(c); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(buf.Bytes(), body) {
				t.Fatalf("re-written request differs\n got %x\nwant %x", buf.Bytes(), body)
			}
		})
	}
}

func TestUpstreamEncodings(t *testing.T) {
	for _, c := range []struct{ offered, want []string }{
		{nil, []string{"identity"}},
		{[]string{"identity"}, []string{"identity"}},
		{[]string{"zstd-8mb", "zlib", "identity"}, []string{"zstd-8mb", "zlib", "identity"}},
		{[]string{"zlib", "identity"}, []string{"zlib", "identity"}},
		{[]string{"zlib"}, []string{"zlib", "identity"}},
		{[]string{"brotli", "zlib", "zlib"}, []string{"zlib", "identity"}},
		{[]string{"identity", "zlib"}, []string{"identity", "zlib"}},
		{[]string{"zstd-16mb"}, []string{"identity"}},
	} {
		if got := UpstreamEncodings(c.offered); !slices.Equal(got, c.want) {
			t.Errorf("UpstreamEncodings(%q) = %q, want %q", c.offered, got, c.want)
		}
	}
}

// compressor is what Mercurial's stream encoders do: Write is encode() (output as the
// compressor releases it), Flush is flush() at the end of each command.
type compressor interface {
	io.Writer
	Flush() error
}

// mercurialShapedResponse encodes objects as Mercurial's serverreactor frames them (see
// bufferingcommandresponseemitter): stream settings; the encoded status, in a frame of its own
// unless the compressor held it back; object chunks encoded one by one, their output coalesced
// into frames of at most maxFrame bytes; at the end the flush, in end-of-stream frame(s).
func mercurialShapedResponse(t testing.TB, encoding string, requestID uint16, newComp func(io.Writer) compressor, objects ...[]byte) []byte {
	t.Helper()
	const maxFrame = DefaultMaxPayload
	var out, cbuf bytes.Buffer
	c := newComp(&cbuf)
	begun := false
	frame := func(typ FrameType, sflags, flags uint8, payload []byte) {
		if !begun {
			sflags |= StreamBegin
			begun = true
		}
		out.Write(AppendFrame(nil, Frame{RequestID: requestID, StreamID: 2, StreamFlags: sflags, Type: typ, Flags: flags, Payload: payload}))
	}
	encode := func(b []byte) []byte {
		cbuf.Reset()
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
		return bytes.Clone(cbuf.Bytes())
	}
	frame(TypeStreamSettings, 0, FlagSettingsEOS, mustMarshal(t, encoding))
	if ok := encode(mustMarshal(t, Status{Status: StatusOK})); len(ok) > 0 {
		frame(TypeCommandResponse, StreamEncoded, FlagResponseContinuation, ok)
	}
	var pending []byte
	for _, o := range objects {
		data := encode(o)
		if len(data) == 0 {
			continue
		}
		if len(data) > maxFrame {
			if len(pending) > 0 {
				frame(TypeCommandResponse, StreamEncoded, FlagResponseContinuation, pending)
				pending = nil
			}
			for len(data) > 0 {
				n := min(len(data), maxFrame)
				frame(TypeCommandResponse, StreamEncoded, FlagResponseContinuation, data[:n])
				data = data[n:]
			}
			continue
		}
		if len(pending)+len(data) >= maxFrame {
			frame(TypeCommandResponse, StreamEncoded, FlagResponseContinuation, pending)
			pending = nil
		}
		pending = append(pending, data...)
	}
	if len(pending) > 0 {
		frame(TypeCommandResponse, StreamEncoded, FlagResponseContinuation, pending)
	}
	cbuf.Reset()
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	tail := cbuf.Bytes()
	for {
		n := min(len(tail), maxFrame)
		var sflags uint8
		if len(tail) > 0 {
			sflags = StreamEncoded
		}
		if n == len(tail) {
			frame(TypeCommandResponse, sflags, FlagResponseEOS, tail)
			break
		}
		frame(TypeCommandResponse, sflags, FlagResponseContinuation, tail[:n])
		tail = tail[n:]
	}
	return out.Bytes()
}

func zstdComp(t testing.TB, opts ...zstd.EOption) func(io.Writer) compressor {
	return func(w io.Writer) compressor {
		e, err := zstd.NewWriter(w, append([]zstd.EOption{zstd.WithEncoderConcurrency(1)}, opts...)...)
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
}

func zlibComp(w io.Writer) compressor { return zlib.NewWriter(w) }

// cborChunks encodes values as Mercurial streams them: each value separately, a byte string's
// header apart from its bytes.
func cborChunks(t testing.TB, values ...any) (chunks [][]byte, all []byte) {
	for _, v := range values {
		b := mustMarshal(t, v)
		if s, ok := v.([]byte); ok && len(s) > 0 {
			chunks = append(chunks, b[:len(b)-len(s)], b[len(b)-len(s):])
		} else {
			chunks = append(chunks, b)
		}
		all = append(all, b...)
	}
	return chunks, all
}

// randomText is lines drawn from a pool of random ones: compressible as source is, with
// matches at every distance.
func randomText(rng *rand.Rand, n int) []byte {
	pool := make([][]byte, 4096)
	for i := range pool {
		pool[i] = fmt.Appendf(nil, "line %d: %x %x\n", i, rng.Uint64(), rng.Uint32()%64)
	}
	b := make([]byte, 0, n+64)
	for len(b) < n {
		b = append(b, pool[rng.IntN(len(pool))]...)
	}
	return b[:n]
}

// klauspost's zstd encoder stands in for python-zstandard: at its fastest and best levels, with
// windows up to 8 MiB and data larger than the window, flushed once per command as Mercurial
// does; the assembler's pieces are bounded.
func TestZstdMercurialShapeDecodes(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	text := randomText(rng, 9<<20) // larger than the 8 MiB window
	random := make([]byte, 200<<10)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	for _, c := range []struct {
		name string
		comp func(io.Writer) compressor
		text int
	}{
		{"zstd-fastest", zstdComp(t, zstd.WithEncoderLevel(zstd.SpeedFastest)), len(text)},
		{"zstd-better-8mb-window", zstdComp(t, zstd.WithEncoderLevel(zstd.SpeedBetterCompression), zstd.WithWindowSize(8<<20)), len(text)},
		{"zlib", zlibComp, 1 << 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			chunks, want := cborChunks(t, Map{"totalitems": 3}, Map{"node": "n1"}, text[:c.text], Map{"node": "n2"}, random, []byte("tail"))
			enc := EncodingZstd8MB
			if c.name == "zlib" {
				enc = EncodingZlib
			}
			frames := mercurialShapedResponse(t, enc, 1, c.comp, chunks...)
			if len(frames) > len(want) {
				t.Fatalf("encoded response %d bytes, larger than the %d object bytes", len(frames), len(want))
			}
			fr := NewReader(bytes.NewReader(frames), ReaderOptions{Side: ClientSide, MaxTotal: -1})
			asm := NewResponseAssembler(1)
			var got []byte
			for {
				f, err := fr.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				if err := asm.AddFunc(f, func(p []byte) error {
					if len(p) > decodeChunk {
						t.Fatalf("piece of %d bytes", len(p))
					}
					got = append(got, p...)
					return nil
				}); err != nil {
					t.Fatal(err)
				}
			}
			if !asm.Done() || !bytes.Equal(got, want) {
				t.Fatalf("done=%v, %d bytes, want %d", asm.Done(), len(got), len(want))
			}
		})
	}
}

// Everything of a command is decodable at its end-of-stream frame: the flush makes it so, and the
// decoder hands it on without waiting for input that will not come.
func TestEncodedCommandCompleteAtItsEnd(t *testing.T) {
	_, want := cborChunks(t, Map{"totalitems": 1}, []byte("x"))
	for _, enc := range []string{EncodingZlib, EncodingZstd8MB} {
		comp := zlibComp
		if enc == EncodingZstd8MB {
			comp = zstdComp(t)
		}
		frames := mercurialShapedResponse(t, enc, 1, comp, want)
		// A trailing frame for another request follows on the same stream and is never read.
		r, err := ReadResponse(io.MultiReader(bytes.NewReader(frames), blockingReader{}), 1, ReaderOptions{})
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: %q, %v", enc, got, err)
		}
	}
}

// blockingReader fails the test's deadline if read: a response must be complete without it.
type blockingReader struct{}

func (blockingReader) Read([]byte) (int, error) {
	return 0, errors.New("read past the end-of-stream frame")
}

func TestZstdWindowOver8MBRefused(t *testing.T) {
	big := randomText(rand.New(rand.NewPCG(3, 4)), 100<<10)
	frames := mercurialShapedResponse(t, EncodingZstd8MB, 1, zstdComp(t, zstd.WithWindowSize(16<<20), zstd.WithSingleSegment(false)), big)
	_, err := ReadResponse(bytes.NewReader(frames), 1, ReaderOptions{})
	if !errors.Is(err, ErrDecodeLimit) || !strings.Contains(err.Error(), "window") {
		t.Fatalf("16 MiB window: %v, want ErrDecodeLimit naming the window", err)
	}
}

// A small stream that decodes to a lot is refused once it passes the ratio (the default limits),
// or the total (a set limit), with an error that says so; memory stays bounded meanwhile.
func TestDecompressionBombRefused(t *testing.T) {
	zeros := make([]byte, 1<<20)
	bomb := func(comp func(io.Writer) compressor, enc string, mib int) []byte {
		objs := make([][]byte, mib)
		for i := range objs {
			objs[i] = zeros
		}
		return mercurialShapedResponse(t, enc, 1, comp, objs...)
	}
	zstdBomb := bomb(zstdComp(t), EncodingZstd8MB, 80)
	zlibBomb := bomb(zlibComp, EncodingZlib, 24)
	for _, c := range []struct {
		name   string
		frames []byte
		limits DecodeLimits
		want   string
	}{
		{"zstd-default-limits", zstdBomb, DecodeLimits{}, "more than 4096 times"},
		{"zlib-max-decoded", zlibBomb, DecodeLimits{MaxDecoded: 8 << 20}, "more than 8388608 bytes"},
		{"zstd-ratio", zstdBomb, DecodeLimits{MaxRatio: 100, RatioFloor: 1 << 20}, "more than 100 times"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			r, err := ReadResponse(bytes.NewReader(c.frames), 1, ReaderOptions{Decode: c.limits})
			var n int64
			if err == nil {
				n, err = io.Copy(io.Discard, r)
			}
			runtime.ReadMemStats(&after)
			if !errors.Is(err, ErrDecodeLimit) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("after %d bytes (of a %d-byte stream): %v, want ErrDecodeLimit with %q", n, len(c.frames), err, c.want)
			}
			// Decoding allocates its window and buffers once, nothing per decoded byte.
			if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 24<<20 {
				t.Errorf("allocated %d MiB while decoding %d MiB", alloc>>20, n>>20)
			}
		})
	}
	// Without limits the same zlib stream decodes: the limit is what refused it.
	r, err := ReadResponse(bytes.NewReader(zlibBomb), 1, ReaderOptions{Decode: DecodeLimits{MaxRatio: -1}})
	if err != nil {
		t.Fatal(err)
	}
	if n, err := io.Copy(io.Discard, r); err != nil || n != 24<<20 {
		t.Fatalf("unlimited: %d bytes, %v", n, err)
	}
}

func TestEncodedStreamErrors(t *testing.T) {
	settings := func(payload []byte, flags uint8) Frame {
		return Frame{RequestID: 1, StreamID: 2, StreamFlags: StreamBegin, Type: TypeStreamSettings, Flags: flags, Payload: payload}
	}
	data := func(payload []byte, flags uint8) Frame {
		return Frame{RequestID: 1, StreamID: 2, StreamFlags: StreamEncoded, Type: TypeCommandResponse, Flags: flags, Payload: payload}
	}
	var zbuf bytes.Buffer
	zw := zlib.NewWriter(&zbuf)
	zw.Write(mustMarshal(t, Status{Status: StatusOK}))
	zw.Write([]byte{0x41, 'x'})
	zw.Close() // a finished zlib stream (Mercurial never finishes its)
	finished := zbuf.Bytes()
	for _, c := range []struct {
		name   string
		frames []Frame
		want   error
		text   string
	}{
		{"unknown encoding", []Frame{settings(mustMarshal(t, "brotli"), FlagSettingsEOS)}, ErrUnsupportedEncoding, "brotli"},
		{"encoding with parameters", []Frame{settings(append(mustMarshal(t, "zlib"), mustMarshal(t, 9)...), FlagSettingsEOS)}, ErrBadValue, "parameters"},
		{"settings flags", []Frame{settings(mustMarshal(t, "zlib"), FlagSettingsEOS|FlagSettingsContinuation)}, ErrBadFlags, ""},
		{"corrupt zlib", []Frame{settings(mustMarshal(t, "zlib"), FlagSettingsEOS), data([]byte("not zlib at all"), FlagResponseEOS)}, ErrBadEncoding, "zlib"},
		{"corrupt zstd", []Frame{settings(mustMarshal(t, "zstd-8mb"), FlagSettingsEOS), data([]byte("not zstd at all"), FlagResponseEOS)}, ErrBadEncoding, "zstd-8mb"},
		{"bytes after a finished zlib stream", []Frame{settings(mustMarshal(t, "zlib"), FlagSettingsEOS),
			data(finished, FlagResponseContinuation), data([]byte{1, 2, 3}, FlagResponseEOS)}, ErrBadEncoding, "after the end"},
		{"ends inside the status", []Frame{settings(mustMarshal(t, "identity"), FlagSettingsEOS), data([]byte{0xa1}, FlagResponseEOS)}, ErrIncomplete, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			asm := NewResponseAssembler(1)
			var err error
			for _, f := range c.frames {
				if _, err = asm.Add(f); err != nil {
					break
				}
			}
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.text) {
				t.Fatalf("got %v, want %v containing %q", err, c.want, c.text)
			}
			if _, again := asm.Add(c.frames[len(c.frames)-1]); again != err {
				t.Fatalf("second call: %v, want the first error again", again)
			}
		})
	}
}

// A stream-settings payload may span frames (continuation, then end), as Mercurial's client
// accepts; an encoded flag on a stream without settings means identity.
func TestStreamSettingsAcrossFrames(t *testing.T) {
	var zbuf bytes.Buffer
	zw := zlib.NewWriter(&zbuf)
	zw.Write(append(mustMarshal(t, Status{Status: StatusOK}), 0x41, 'x'))
	zw.Flush()
	name := mustMarshal(t, "zlib")
	asm := NewResponseAssembler(1)
	var got []byte
	for _, f := range []Frame{
		{RequestID: 1, StreamID: 2, StreamFlags: StreamBegin, Type: TypeStreamSettings, Flags: FlagSettingsContinuation, Payload: name[:2]},
		{RequestID: 1, StreamID: 2, Type: TypeStreamSettings, Flags: FlagSettingsEOS, Payload: name[2:]},
		{RequestID: 1, StreamID: 2, StreamFlags: StreamEncoded, Type: TypeCommandResponse, Flags: FlagResponseEOS, Payload: zbuf.Bytes()},
	} {
		data, err := asm.Add(f)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, data...)
	}
	if string(got) != "\x41x" || !asm.Done() {
		t.Fatalf("got %q done=%v", got, asm.Done())
	}

	asm = NewResponseAssembler(1)
	data, err := asm.Add(Frame{RequestID: 1, StreamID: 2, StreamFlags: StreamBegin | StreamEncoded, Type: TypeCommandResponse,
		Flags: FlagResponseEOS, Payload: append(mustMarshal(t, Status{Status: StatusOK}), 0x41, 'y')})
	if err != nil || string(data) != "\x41y" {
		t.Fatalf("encoded flag without settings: %q, %v", data, err)
	}
}

// Decoders run as coroutines; they end with the response, on an error, or on Close.
func TestDecodersDoNotOutliveTheirResponse(t *testing.T) {
	frames := readVector(t, "zlib-big.frames")
	base := runtime.NumGoroutine()
	var rs []*Response
	for range 20 {
		r, err := ReadResponse(bytes.NewReader(frames), 1, ReaderOptions{})
		if err != nil {
			t.Fatal(err)
		}
		rs = append(rs, r)
	}
	if n := runtime.NumGoroutine(); n < base+20 {
		t.Fatalf("%d goroutines with 20 responses open, %d before: decoders are not what this test thinks", n, base)
	}
	for i, r := range rs {
		if i%2 == 0 {
			if _, err := io.Copy(io.Discard, r); err != nil {
				t.Fatal(err)
			}
		} else {
			r.Close()
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines, %d before", runtime.NumGoroutine(), base)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// BenchmarkAssembleEncoded is the agent's per-frame cost on Mercurial's own answers: read each
// frame and hand on its decoded object bytes (b.SetBytes: object bytes).
func BenchmarkAssembleEncoded(b *testing.B) {
	for _, name := range []string{"identity-big", "zlib-big", "zstd8mb-big"} {
		frames := readVector(b, name+".frames")
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(len(readVector(b, "big.cbor"))))
			for b.Loop() {
				fr := NewReader(bytes.NewReader(frames), ReaderOptions{Side: ClientSide, MaxTotal: -1})
				asm := NewResponseAssembler(1)
				for {
					f, err := fr.Next()
					if err != nil {
						break
					}
					if err := asm.AddFunc(f, func([]byte) error { return nil }); err != nil {
						b.Fatal(err)
					}
				}
				asm.Close()
			}
		})
	}
}
