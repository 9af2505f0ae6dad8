package hgbundle

// The bundle2 (HG20) framing, as Mercurial's bundle2.py writes it:
//
//	"HG20" | int32 params size | params (space separated, name=value, both URL-quoted)
//	parts: int32 header size (0 ends the stream) | header | payload chunks
//	header: uint8 type size | type | uint32 part id | uint8 mandatory count | uint8 advisory count
//	        | (uint8 key size, uint8 value size) per parameter | keys and values
//	payload: int32 chunk size | chunk ..., ended by a zero size; -1 interrupts the part with an
//	        out-of-band part (the producer failed mid-part)
//
// All integers are big-endian. Everything after the stream parameters is compressed when the
// parameters say Compression=GZ|ZS|BZ.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/url"
	"slices"
	"strings"
)

// Magic starts every bundle2 stream.
const Magic = "HG20"

// Bounds on what a header may claim, so that a corrupt stream cannot make the reader allocate
// without limit. Mercurial's own headers are a few hundred bytes.
const (
	maxParamsSize     = 1 << 16
	maxPartHeaderSize = 1 << 20
)

// ErrOriginAbort is wrapped by the error a Reader returns when the stream carries an error part:
// the origin refused or failed to produce the bundle (for instance an unknown head, or no common
// changegroup version).
var ErrOriginAbort = errors.New("origin aborted the bundle")

// Param is one parameter of a stream or a part, unquoted.
type Param struct{ Key, Value string }

// Part is the header of one bundle2 part.
type Part struct {
	Type      string // as written: upper-case letters make the part mandatory
	ID        uint32
	Mandatory []Param
	Advisory  []Param
}

// Param returns the value of the parameter key, mandatory or advisory.
func (p Part) Param(key string) (string, bool) {
	for _, ps := range [][]Param{p.Mandatory, p.Advisory} {
		for _, kv := range ps {
			if kv.Key == key {
				return kv.Value, true
			}
		}
	}
	return "", false
}

type readerState int

const (
	stStart readerState = iota
	stPartHeader
	stChunkSize
	stPayload
	stEnd
	stDone
)

// Reader passes an uncompressed HG20 stream through unchanged while it checks the framing. A Read
// returns an error instead of io.EOF when the stream ends early (a truncated response), carries
// an error part or an interrupted part (the origin failed: ErrOriginAbort), is compressed, or has
// bytes after its end marker; so whatever consumes the bytes (a hashing upload) sees the failure
// before it would commit a bundle that no client could apply. Payloads are passed through as they
// arrive; only stream parameters and part headers are held, so memory stays bounded.
type Reader struct {
	src     *bufio.Reader
	state   readerState
	pending []byte // bytes checked and not yet returned
	buf     []byte // pending's storage, reused once it is drained
	payload int64  // bytes of the current payload chunk still to pass through
	params  []Param
	parts   []Part
	err     error
}

// NewReader returns a Reader of the HG20 stream r.
func NewReader(r io.Reader) *Reader {
	return &Reader{src: bufio.NewReaderSize(r, 64<<10)}
}

// Params returns the stream parameters (read with the first Read or NextPart).
func (r *Reader) Params() []Param { return r.params }

// Parts returns the headers of the parts read so far, in order.
func (r *Reader) Parts() []Part { return r.parts }

// NextPart reads until the next part header and returns it, keeping the bytes it read for the
// following Reads; io.EOF when the stream ends without another part. It must be called between
// parts (before the first Read, or when the payload of the last part has been read).
func (r *Reader) NextPart() (Part, error) {
	n := len(r.parts)
	for len(r.parts) == n {
		if r.err != nil {
			return Part{}, r.err
		}
		switch r.state {
		case stPayload:
			return Part{}, errors.New("bundle2: NextPart called inside a part's payload")
		case stEnd, stDone:
			return Part{}, io.EOF
		}
		r.step()
	}
	return r.parts[n], nil
}

// Read implements io.Reader.
func (r *Reader) Read(p []byte) (int, error) {
	for {
		if len(r.pending) > 0 {
			n := copy(p, r.pending)
			r.pending = r.pending[n:]
			return n, nil
		}
		if r.err != nil {
			return 0, r.err
		}
		if len(p) == 0 {
			return 0, nil
		}
		if r.state == stPayload {
			want := int64(len(p))
			if want > r.payload {
				want = r.payload
			}
			n, err := r.src.Read(p[:want])
			r.payload -= int64(n)
			if r.payload == 0 {
				r.state = stChunkSize
			}
			if err == io.EOF {
				err = nil
				if r.payload > 0 {
					r.fail(r.truncated())
				}
			}
			if n > 0 || err != nil {
				if err != nil {
					r.fail(fmt.Errorf("bundle2: %w", err))
				}
				return n, nil
			}
			continue
		}
		if r.state == stDone {
			return 0, io.EOF
		}
		r.step()
	}
}

func (r *Reader) fail(err error) {
	if r.err == nil {
		r.err = err
	}
}

// truncated names where the stream ended early.
func (r *Reader) truncated() error {
	where := "in the stream header"
	if n := len(r.parts); n > 0 {
		where = fmt.Sprintf("in part %d (%s)", n-1, r.parts[n-1].Type)
	}
	return fmt.Errorf("bundle2: stream truncated %s: %w", where, io.ErrUnexpectedEOF)
}

// read reads exactly n bytes of framing and queues them for Read.
func (r *Reader) read(n int) ([]byte, bool) {
	if len(r.pending) == 0 {
		r.pending = r.buf[:0]
	}
	start := len(r.pending)
	r.pending = slices.Grow(r.pending, n)[:start+n]
	if start == 0 {
		r.buf = r.pending
	}
	if _, err := io.ReadFull(r.src, r.pending[start:]); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			r.fail(r.truncated())
		} else {
			r.fail(fmt.Errorf("bundle2: %w", err))
		}
		return nil, false
	}
	return r.pending[start:], true
}

func (r *Reader) readInt32() (int32, bool) {
	b, ok := r.read(4)
	if !ok {
		return 0, false
	}
	return int32(binary.BigEndian.Uint32(b)), true
}

// step reads one unit of framing: the stream header, a part header, a chunk size or the check
// that nothing follows the end marker.
func (r *Reader) step() {
	switch r.state {
	case stStart:
		magic, ok := r.read(4)
		if !ok {
			return
		}
		if string(magic) != Magic {
			r.fail(fmt.Errorf("bundle2: stream starts with %q, not %q", magic, Magic))
			return
		}
		size, ok := r.readInt32()
		if !ok {
			return
		}
		if size < 0 || size > maxParamsSize {
			r.fail(fmt.Errorf("bundle2: stream parameters size %d out of range", size))
			return
		}
		raw, ok := r.read(int(size))
		if !ok {
			return
		}
		params, err := parseStreamParams(string(raw))
		if err != nil {
			r.fail(err)
			return
		}
		for _, p := range params {
			if strings.EqualFold(p.Key, "compression") {
				r.fail(fmt.Errorf("bundle2: stream is compressed (Compression=%s); the reader checks uncompressed streams", p.Value))
				return
			}
		}
		r.params = params
		r.state = stPartHeader
	case stPartHeader:
		size, ok := r.readInt32()
		if !ok {
			return
		}
		switch {
		case size == 0:
			r.state = stEnd
			return
		case size < 0 || size > maxPartHeaderSize:
			r.fail(fmt.Errorf("bundle2: part header size %d out of range", size))
			return
		}
		raw, ok := r.read(int(size))
		if !ok {
			return
		}
		part, err := parsePartHeader(raw)
		if err != nil {
			r.fail(err)
			return
		}
		r.parts = append(r.parts, part)
		if strings.HasPrefix(strings.ToLower(part.Type), "error:") {
			r.fail(partError(part))
			return
		}
		r.state = stChunkSize
	case stChunkSize:
		size, ok := r.readInt32()
		if !ok {
			return
		}
		switch {
		case size == 0:
			r.state = stPartHeader
		case size == -1:
			r.fail(fmt.Errorf("bundle2: part %d (%s) interrupted by the producer: %w",
				len(r.parts)-1, r.parts[len(r.parts)-1].Type, ErrOriginAbort))
		case size < 0:
			r.fail(fmt.Errorf("bundle2: negative payload chunk size %d", size))
		default:
			r.payload = int64(size)
			r.state = stPayload
		}
	case stEnd:
		if _, err := r.src.ReadByte(); err == nil {
			r.fail(errors.New("bundle2: bytes after the end-of-stream marker"))
			return
		} else if err != io.EOF {
			r.fail(fmt.Errorf("bundle2: %w", err))
			return
		}
		r.state = stDone
	}
}

// partError describes an error part (error:abort, error:unsupportedcontent, error:pushraced …).
func partError(p Part) error {
	var b strings.Builder
	for _, k := range []string{"message", "parttype", "params", "hint"} {
		if v, ok := p.Param(k); ok {
			fmt.Fprintf(&b, " %s=%q", k, v)
		}
	}
	return fmt.Errorf("bundle2: %s part:%s: %w", p.Type, b.String(), ErrOriginAbort)
}

// parseStreamParams reads "name=value name2 …", both URL-quoted.
func parseStreamParams(s string) ([]Param, error) {
	if s == "" {
		return nil, nil
	}
	var out []Param
	for _, f := range strings.Split(s, " ") {
		k, v, _ := strings.Cut(f, "=")
		key, err1 := url.PathUnescape(k)
		val, err2 := url.PathUnescape(v)
		if err := errors.Join(err1, err2); err != nil {
			return nil, fmt.Errorf("bundle2: stream parameter %q: %w", f, err)
		}
		if key == "" {
			return nil, errors.New("bundle2: empty stream parameter name")
		}
		out = append(out, Param{key, val})
	}
	return out, nil
}

// formatStreamParams is parseStreamParams' inverse.
func formatStreamParams(ps []Param) string {
	fs := make([]string, len(ps))
	for i, p := range ps {
		fs[i] = Quote(p.Key)
		if p.Value != "" {
			fs[i] += "=" + Quote(p.Value)
		}
	}
	return strings.Join(fs, " ")
}

func parsePartHeader(b []byte) (Part, error) {
	bad := func(what string) (Part, error) {
		return Part{}, fmt.Errorf("bundle2: part header (%d bytes) too short for its %s", len(b), what)
	}
	if len(b) < 1 {
		return bad("type size")
	}
	n := int(b[0])
	b = b[1:]
	if len(b) < n+4+2 {
		return bad("type, id and parameter counts")
	}
	p := Part{Type: string(b[:n]), ID: binary.BigEndian.Uint32(b[n:])}
	if p.Type == "" {
		return Part{}, errors.New("bundle2: part with an empty type")
	}
	b = b[n+4:]
	mand, adv := int(b[0]), int(b[1])
	b = b[2:]
	if len(b) < 2*(mand+adv) {
		return bad("parameter sizes")
	}
	sizes := b[:2*(mand+adv)]
	b = b[2*(mand+adv):]
	for i := 0; i < mand+adv; i++ {
		ks, vs := int(sizes[2*i]), int(sizes[2*i+1])
		if len(b) < ks+vs {
			return bad("parameters")
		}
		kv := Param{string(b[:ks]), string(b[ks : ks+vs])}
		b = b[ks+vs:]
		if i < mand {
			p.Mandatory = append(p.Mandatory, kv)
		} else {
			p.Advisory = append(p.Advisory, kv)
		}
	}
	if len(b) != 0 {
		return Part{}, fmt.Errorf("bundle2: %d bytes after the parameters of part %q", len(b), p.Type)
	}
	return p, nil
}
