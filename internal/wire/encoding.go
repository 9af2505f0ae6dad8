package wire

import (
	"compress/zlib"
	"errors"
	"fmt"
	"io"
	"iter"
	"slices"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// Content encodings of a server's response stream, as Mercurial names them.
//
// How Mercurial (4.8 to 5.8, wireprotoframing.py) encodes a response: the client lists the
// encodings it accepts in its sender-protocol-settings frame (`contentencodings`, every one its
// build has, in the order zstd-8mb, zlib, identity; the pure-Python build lacks zstd). The server
// opens one output stream per HTTP response and picks the first encoding in its own order
// (zstd-8mb, zlib, identity) that the client listed. Before the first command's response it
// sends one stream-settings frame naming it; from then on one compression context runs through
// the whole stream, across every command the response carries, and is never finished: the
// frames' payloads are the compressor's output as it comes (not aligned to frames or to CBOR
// values), frames whose payload went through the compressor carry the stream flag 0x04, and at
// the end of each command the compressor is flushed (zlib Z_SYNC_FLUSH, zstd flush-block) into
// the command's end-of-stream frame(s), so every command's bytes are decodable by its end. The
// client decodes every frame carrying 0x04 through the stream's decoder (identity when the stream
// had no settings) and reads the result as if it had come unencoded; a zstd-8mb decoder refuses
// windows larger than 8 MiB.
const (
	EncodingIdentity = "identity"
	EncodingZlib     = "zlib"
	EncodingZstd8MB  = "zstd-8mb"
)

// DecodableEncodings are the content encodings this package decodes, in Mercurial's order of
// preference.
var DecodableEncodings = []string{EncodingZstd8MB, EncodingZlib, EncodingIdentity}

// zstdMaxWindow is the largest window a zstd-8mb stream may use.
const zstdMaxWindow = 8 << 20

// zstdDecoders keeps idle zstd decoders: making one costs more than decoding a small answer.
var zstdDecoders sync.Pool

// Errors of encoded streams.
var (
	ErrBadEncoding = errors.New("malformed encoded stream")
	ErrDecodeLimit = errors.New("decoded stream exceeds limit (decompression bomb?)")
)

// UpstreamEncodings returns the content encodings a proxy offers its upstream server on behalf
// of a client that offered `offered` (nil when the client sent no settings): those the client
// accepts and this package decodes, in the client's order, and identity last if the client left
// it out. The server's pick is then one the proxy decodes and, but for identity, one the client
// listed. Identity is always offered because a Mercurial server that has none of the offered
// encodings fails the command ("attempting to send encoded frame without sending stream
// settings", 5.6.1 without zstd offered only zstd-8mb), while every Mercurial client reads
// identity whatever it offered (it is the stream default).
func UpstreamEncodings(offered []string) []string {
	var out []string
	for _, e := range offered {
		if slices.Contains(DecodableEncodings, e) && !slices.Contains(out, e) {
			out = append(out, e)
		}
	}
	if !slices.Contains(out, EncodingIdentity) {
		out = append(out, EncodingIdentity)
	}
	return out
}

// DecodeLimits bound what decoding a response stream may produce. Memory is bounded anyway (a
// zlib window of 32 KiB, a zstd window of at most 8 MiB, output handed on in pieces of at most
// 32 KiB); these bound the volume, so that a small input cannot make the reader produce (and
// store) an unbounded amount.
type DecodeLimits struct {
	// MaxRatio refuses a stream once its decoded bytes exceed MaxRatio times the encoded bytes
	// read so far (and RatioFloor). Default DefaultMaxRatio; negative for no ratio limit.
	MaxRatio int64
	// RatioFloor is the decoded size below which the ratio is not checked. Default
	// DefaultRatioFloor.
	RatioFloor int64
	// MaxDecoded refuses a stream whose decoded bytes exceed it. Zero or negative: no limit.
	MaxDecoded int64
}

// Defaults of DecodeLimits. zlib cannot exceed a ratio of about 1032; zstd can (a run of equal
// bytes), but real Mercurial data (deltas, source, CBOR framing) stays far below 4096.
const (
	DefaultMaxRatio   = 4096
	DefaultRatioFloor = 64 << 20
)

func (l DecodeLimits) withDefaults() DecodeLimits {
	if l.MaxRatio == 0 {
		l.MaxRatio = DefaultMaxRatio
	}
	if l.RatioFloor <= 0 {
		l.RatioFloor = DefaultRatioFloor
	}
	return l
}

// decodeChunk is the most a stream decoder hands on at once.
const decodeChunk = 32 << 10

// decodeStep is what a decoder's coroutine yields: decoded bytes, a request for more input, or
// the end of the stream (err set, io.EOF when the encoded stream ended cleanly).
type decodeStep struct {
	out     []byte
	starved bool
	err     error
}

// streamDecoder decodes one stream's encoded frame payloads. Decoders of the kept libraries pull
// their input; each runs in a coroutine (iter.Pull) whose input is the current frame's payload and
// which yields "starved" when that is used up, so the caller pushes one frame at a time and gets
// back, synchronously, everything decodable so far.
type streamDecoder struct {
	name     string
	limits   DecodeLimits
	in       []byte
	yield    func(decodeStep) bool
	next     func() (decodeStep, bool)
	stop     func()
	ended    error // set once the coroutine returned
	encoded  int64
	decoded  int64
	stopping bool
}

// newStreamDecoder returns a decoder for name, or nil for identity.
func newStreamDecoder(name string, limits DecodeLimits) (*streamDecoder, error) {
	var open func(io.Reader) (io.Reader, func(), error)
	switch name {
	case EncodingIdentity:
		return nil, nil
	case EncodingZlib:
		open = func(r io.Reader) (io.Reader, func(), error) {
			zr, err := zlib.NewReader(r)
			if err != nil {
				return nil, nil, err
			}
			return zr, func() { zr.Close() }, nil
		}
	case EncodingZstd8MB:
		open = func(r io.Reader) (io.Reader, func(), error) {
			zr, _ := zstdDecoders.Get().(*zstd.Decoder)
			if zr == nil {
				var err error
				zr, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
					zstd.WithDecoderMaxWindow(zstdMaxWindow), zstd.WithDecoderMaxMemory(zstdMaxWindow))
				if err != nil {
					return nil, nil, err
				}
			}
			if err := zr.Reset(r); err != nil {
				zr.Close()
				return nil, nil, err
			}
			return zr, func() {
				// Reset(nil) drops the stream; the decoder's tables and buffers are kept for the next.
				if zr.Reset(nil) == nil {
					zstdDecoders.Put(zr)
				}
			}, nil
		}
	default:
		return nil, fmt.Errorf("%w: %q", ErrUnsupportedEncoding, name)
	}
	d := &streamDecoder{name: name, limits: limits.withDefaults()}
	d.next, d.stop = iter.Pull(func(yield func(decodeStep) bool) {
		d.yield = yield
		r, closeFn, err := open(d)
		if err != nil {
			yield(decodeStep{err: err})
			return
		}
		defer closeFn()
		buf := make([]byte, decodeChunk)
		for {
			n, err := r.Read(buf)
			if n > 0 && !yield(decodeStep{out: buf[:n]}) {
				return
			}
			if err != nil {
				yield(decodeStep{err: err})
				return
			}
		}
	})
	return d, nil
}

var errDecoderStopped = errors.New("decoder stopped")

// Read and ReadByte give the coroutine's decoder the current frame's payload, and yield
// "starved" when it is used up. The decoders read exactly what they need (zlib through
// ReadByte, zstd block by block), so "starved" means everything decodable so far was handed on.
func (d *streamDecoder) Read(p []byte) (int, error) {
	if err := d.wait(); err != nil {
		return 0, err
	}
	n := copy(p, d.in)
	d.in = d.in[n:]
	return n, nil
}

func (d *streamDecoder) ReadByte() (byte, error) {
	if err := d.wait(); err != nil {
		return 0, err
	}
	b := d.in[0]
	d.in = d.in[1:]
	return b, nil
}

func (d *streamDecoder) wait() error {
	for len(d.in) == 0 {
		if d.stopping || !d.yield(decodeStep{starved: true}) {
			d.stopping = true
			return errDecoderStopped
		}
	}
	return nil
}

// feed decodes one frame's payload and passes the decoded bytes to fn in pieces of at most
// decodeChunk bytes, valid only during the call.
func (d *streamDecoder) feed(payload []byte, fn func([]byte) error) error {
	if d.ended != nil {
		if d.ended == io.EOF && len(payload) == 0 {
			return nil
		}
		if d.ended == io.EOF {
			return fmt.Errorf("%w: %s: %d bytes after the end of the encoded stream", ErrBadEncoding, d.name, len(payload))
		}
		return d.ended
	}
	d.encoded += int64(len(payload))
	d.in = payload
	defer func() { d.in = nil }()
	for {
		s, ok := d.next()
		switch {
		case !ok:
			d.ended = fmt.Errorf("%w: %s decoder ended", ErrBadEncoding, d.name)
			return d.ended
		case s.starved:
			return nil
		case s.err == io.EOF:
			// The encoder finished its stream (Mercurial never does); nothing may follow.
			d.ended = io.EOF
			if len(d.in) > 0 {
				return fmt.Errorf("%w: %s: %d bytes after the end of the encoded stream", ErrBadEncoding, d.name, len(d.in))
			}
			return nil
		case s.err != nil:
			d.ended = fmt.Errorf("%w: %s: %v", ErrBadEncoding, d.name, s.err)
			if errors.Is(s.err, zstd.ErrWindowSizeExceeded) || errors.Is(s.err, zstd.ErrDecoderSizeExceeded) {
				d.ended = fmt.Errorf("%w: %s: window larger than %d bytes: %v", ErrDecodeLimit, d.name, zstdMaxWindow, s.err)
			}
			d.stop()
			return d.ended
		}
		d.decoded += int64(len(s.out))
		if err := d.checkLimits(); err != nil {
			d.ended = err
			d.stop()
			return err
		}
		if err := fn(s.out); err != nil {
			return err
		}
	}
}

func (d *streamDecoder) checkLimits() error {
	l := d.limits
	if l.MaxDecoded > 0 && d.decoded > l.MaxDecoded {
		return fmt.Errorf("%w: %s stream decoded to more than %d bytes", ErrDecodeLimit, d.name, l.MaxDecoded)
	}
	if l.MaxRatio > 0 && d.decoded > l.RatioFloor && d.decoded > l.MaxRatio*d.encoded {
		return fmt.Errorf("%w: %s stream decoded to %d bytes from %d (more than %d times)", ErrDecodeLimit,
			d.name, d.decoded, d.encoded, l.MaxRatio)
	}
	return nil
}

// close ends the decoder's coroutine.
func (d *streamDecoder) close() {
	if d.ended == nil {
		d.ended = fmt.Errorf("%w: %s decoder closed", ErrBadEncoding, d.name)
	}
	d.stop()
}
