package wire

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"iter"
	"runtime"
)

// Media types of the HTTP transport.
const (
	MediaTypeFraming = "application/mercurial-exp-framing-0006"
	MediaTypeCBOR    = "application/mercurial-cbor"
	APIVersion       = "exp-http-v2-0003"
)

// Status values of a command response.
const (
	StatusOK       = "ok"
	StatusError    = "error"
	StatusRedirect = "redirect"
)

// Location is the `location` of a redirect response: where to GET the command's CBOR objects.
// Fields are in Mercurial's key order.
type Location struct {
	FullHashes       [][]string `cbor:"fullhashes,omitempty"` // [algorithm, raw digest] pairs
	FullHashSeed     string     `cbor:"fullhashseed,omitempty"`
	MediaType        string     `cbor:"mediatype"`
	ServerCADERCerts []string   `cbor:"servercadercerts,omitempty"`
	ServerDERCerts   []string   `cbor:"serverdercerts,omitempty"`
	Size             *uint64    `cbor:"size,omitempty"`
	URL              string     `cbor:"url"`
}

// ErrorInfo is the `error` of an error status.
type ErrorInfo struct {
	Args    []any  `cbor:"args,omitempty"`
	Message string `cbor:"message"`
}

// Status is the first CBOR value of a command response.
type Status struct {
	Error    *ErrorInfo `cbor:"error,omitempty"`
	Location *Location  `cbor:"location,omitempty"`
	Status   string     `cbor:"status"`
}

// FullHash returns the digest for algorithm in a location's fullhashes, or nil.
func (l *Location) FullHash(algorithm string) []byte {
	for _, p := range l.FullHashes {
		if len(p) == 2 && p[0] == algorithm {
			return []byte(p[1])
		}
	}
	return nil
}

// ErrorResponse is the payload of an error-response frame.
type ErrorResponse struct {
	Message []ErrorAtom `cbor:"message"`
	Type    string      `cbor:"type"` // protocol, server or command
}

// ErrorAtom is one formatted message part.
type ErrorAtom struct {
	Args   []any    `cbor:"args,omitempty"`
	Labels []string `cbor:"labels,omitempty"`
	Msg    string   `cbor:"msg"`
}

// Text returns the error's message parts joined.
func (e *ErrorResponse) Text() string {
	var b bytes.Buffer
	for _, a := range e.Message {
		b.WriteString(a.Msg)
	}
	return b.String()
}

// ResponseWriter writes a server's response frames for requests on one server stream.
type ResponseWriter struct {
	w        *Writer
	streamID uint8
	begun    bool
	encoded  bool
}

// NewResponseWriter returns a writer for server stream 2 with the given maximum frame payload.
func NewResponseWriter(w io.Writer, maxPayload int) *ResponseWriter {
	return &ResponseWriter{w: NewWriter(w, maxPayload), streamID: 2}
}

// flags returns the stream flags of the next frame. Frames whose payload passed through the
// stream's encoder carry the encoded flag; the empty end-of-stream frame does not (as in
// Mercurial's output).
func (rw *ResponseWriter) flags(encodedPayload bool) uint8 {
	var f uint8
	if !rw.begun {
		f |= StreamBegin
		rw.begun = true
	}
	if rw.encoded && encodedPayload {
		f |= StreamEncoded
	}
	return f
}

// WriteStreamSettings announces the stream's content encoding; later frames carry the encoded
// flag. Only identity is supported.
func (rw *ResponseWriter) WriteStreamSettings(requestID uint16, encoding string) error {
	if encoding != EncodingIdentity {
		return fmt.Errorf("%w: %q", ErrUnsupportedEncoding, encoding)
	}
	b, err := encMode.Marshal(encoding)
	if err != nil {
		return err
	}
	err = rw.w.WriteFrame(Frame{RequestID: requestID, StreamID: rw.streamID, StreamFlags: rw.flags(false),
		Type: TypeStreamSettings, Flags: FlagSettingsEOS, Payload: b})
	rw.encoded = true
	return err
}

// WriteData writes bytes of the response's CBOR stream as continuation frames.
func (rw *ResponseWriter) WriteData(requestID uint16, data []byte) error {
	if len(data) == 0 {
		return nil
	}
	f := Frame{RequestID: requestID, StreamID: rw.streamID, StreamFlags: rw.flags(true), Type: TypeCommandResponse}
	return rw.w.WriteSplit(f, data, FlagResponseContinuation, FlagResponseContinuation)
}

// WriteValue encodes v and writes it as response data.
func (rw *ResponseWriter) WriteValue(requestID uint16, v any) error {
	b, err := Marshal(v)
	if err != nil {
		return err
	}
	return rw.WriteData(requestID, b)
}

// WriteEOS ends the command's response with an empty end-of-stream frame.
func (rw *ResponseWriter) WriteEOS(requestID uint16) error {
	return rw.w.WriteFrame(Frame{RequestID: requestID, StreamID: rw.streamID, StreamFlags: rw.flags(false),
		Type: TypeCommandResponse, Flags: FlagResponseEOS})
}

// ErrRedirectTooLarge means a redirect status map does not fit in one frame.
var ErrRedirectTooLarge = errors.New("redirect status does not fit in one frame")

// WriteRedirect writes a complete redirect response: stream settings, then the redirect status in
// a single command-response frame that also carries end-of-stream. Nothing may follow it: a real
// Mercurial client swaps the request's response for the location's body as soon as it decodes the
// status, and applies any later frame of this request (a separate end-of-stream frame included)
// to the fetched body, cutting it short (spec section 6).
func (rw *ResponseWriter) WriteRedirect(requestID uint16, loc *Location) error {
	b, err := Marshal(Status{Status: StatusRedirect, Location: loc})
	if err != nil {
		return err
	}
	if len(b) > rw.w.maxPayload {
		return fmt.Errorf("%w: %d bytes, frames carry at most %d", ErrRedirectTooLarge, len(b), rw.w.maxPayload)
	}
	if err := rw.WriteStreamSettings(requestID, EncodingIdentity); err != nil {
		return err
	}
	return rw.w.WriteFrame(Frame{RequestID: requestID, StreamID: rw.streamID, StreamFlags: rw.flags(true),
		Type: TypeCommandResponse, Flags: FlagResponseEOS, Payload: b})
}

// PreparedRedirect is a redirect response's frames encoded once for a location, with request id 0:
// a hot location is answered by copying them and setting the request id, without encoding the
// location again. Its bytes are WriteRedirect's on a fresh ResponseWriter.
type PreparedRedirect struct {
	frames   []byte
	idOffset [2]int // where each frame's request id is
}

// PrepareRedirect encodes the redirect response for loc.
func PrepareRedirect(loc *Location, maxPayload int) (*PreparedRedirect, error) {
	var buf bytes.Buffer
	if err := NewResponseWriter(&buf, maxPayload).WriteRedirect(0, loc); err != nil {
		return nil, err
	}
	b := buf.Bytes()
	first, err := ParseHeader(b)
	if err != nil {
		return nil, err
	}
	return &PreparedRedirect{frames: b, idOffset: [2]int{3, HeaderSize + first.Length + 3}}, nil
}

// Len is the response's length in bytes.
func (p *PreparedRedirect) Len() int { return len(p.frames) }

// AppendTo appends the response for requestID to dst.
func (p *PreparedRedirect) AppendTo(dst []byte, requestID uint16) []byte {
	n := len(dst)
	dst = append(dst, p.frames...)
	for _, off := range p.idOffset {
		dst[n+off], dst[n+off+1] = byte(requestID), byte(requestID>>8)
	}
	return dst
}

// WriteOK writes a complete ok response with the given objects.
func (rw *ResponseWriter) WriteOK(requestID uint16, objects ...any) error {
	if err := rw.WriteStreamSettings(requestID, EncodingIdentity); err != nil {
		return err
	}
	if err := rw.WriteValue(requestID, Status{Status: StatusOK}); err != nil {
		return err
	}
	for _, o := range objects {
		if err := rw.WriteValue(requestID, o); err != nil {
			return err
		}
	}
	return rw.WriteEOS(requestID)
}

// WriteCommandError writes a complete response with an error status (a command failed).
func (rw *ResponseWriter) WriteCommandError(requestID uint16, msg string) error {
	b, err := Marshal(Status{Status: StatusError, Error: &ErrorInfo{Message: msg}})
	if err != nil {
		return err
	}
	return rw.w.WriteFrame(Frame{RequestID: requestID, StreamID: rw.streamID, StreamFlags: rw.flags(true),
		Type: TypeCommandResponse, Flags: FlagResponseEOS, Payload: b})
}

// WriteErrorFrame writes an error-response frame. kind is "protocol", "server" or "command".
func (rw *ResponseWriter) WriteErrorFrame(requestID uint16, kind, msg string) error {
	b, err := Marshal(ErrorResponse{Type: kind, Message: []ErrorAtom{{Msg: msg}}})
	if err != nil {
		return err
	}
	if len(b) > rw.w.maxPayload {
		return rw.WriteErrorFrame(requestID, kind, msg[:len(msg)/2])
	}
	return rw.w.WriteFrame(Frame{RequestID: requestID, StreamID: rw.streamID, StreamFlags: rw.flags(false),
		Type: TypeErrorResponse, Payload: b})
}

// ErrServerError is wrapped by errors reporting an error-response frame from the server.
var ErrServerError = errors.New("server sent an error response")

// ResponseAssembler follows one command's response frames from a server and splits the CBOR
// stream into the status value and the object bytes after it. It keeps no object bytes: each call
// to Add or AddFunc hands on those the frame carried.
//
// Encoded streams (zstd-8mb, zlib; see EncodingZlib) are decoded: a frame with the encoded stream
// flag goes through its stream's decoder, set by the stream's stream-settings frame, and the
// object bytes handed on are the decoded ones, exactly what the same command answers with
// identity. Frames of other requests on the same stream are decoded too (one compression context
// runs through a stream) and their bytes dropped. A decoder runs until the response ends, an
// error, or Close.
//
// The first error is final: later calls return it again.
type ResponseAssembler struct {
	RequestID uint16
	// Limits bound what decoding may produce; set them before the first frame. Zero fields take
	// defaults.
	Limits DecodeLimits

	status  *Status
	head    []byte
	done    bool
	objects int64
	err     error
	streams *inStreams
	buf     []byte
}

// inStreams is a response's input streams, apart from the assembler so that a cleanup can stop
// their decoders when an assembler is dropped without Close.
type inStreams struct {
	m map[uint8]*inStream
}

type inStream struct {
	settings []byte // stream-settings payload not yet ended
	dec      *streamDecoder
}

func (s *inStreams) closeAll() {
	for _, st := range s.m {
		if st.dec != nil {
			st.dec.close()
			st.dec = nil
		}
	}
}

// NewResponseAssembler follows responses to requestID.
func NewResponseAssembler(requestID uint16) *ResponseAssembler {
	a := &ResponseAssembler{RequestID: requestID, streams: &inStreams{m: map[uint8]*inStream{}}}
	runtime.AddCleanup(a, (*inStreams).closeAll, a.streams)
	return a
}

// maxStatusBytes bounds the bytes buffered while waiting for the status value to complete.
const maxStatusBytes = 1 << 20

// maxSettingsBytes bounds a stream-settings payload split over frames.
const maxSettingsBytes = 64 << 10

// Add consumes one frame and returns the object bytes it carried. For a frame that came
// unencoded they alias its payload (valid until the frame's buffer is reused); decoded bytes are
// gathered in a buffer of the assembler's, valid until the next call. A single encoded frame may
// decode to many times its size: AddFunc hands them on in bounded pieces instead.
func (a *ResponseAssembler) Add(f Frame) ([]byte, error) {
	var out []byte
	encoded := f.StreamFlags&StreamEncoded != 0
	a.buf = a.buf[:0]
	err := a.AddFunc(f, func(p []byte) error {
		if !encoded && out == nil {
			out = p
			return nil
		}
		a.buf = append(a.buf, p...)
		out = a.buf
		return nil
	})
	return out, err
}

// AddFunc consumes one frame and passes the object bytes it carried to fn, in pieces of at most
// 32 KiB when they are decoded; a piece is valid only during the call. An error from fn is
// returned as it is (and is final, like every other). Frames of other requests are ignored,
// except error responses (a server that could not parse a request may not know its id) and what
// keeps an encoded stream's decoder in step.
func (a *ResponseAssembler) AddFunc(f Frame, fn func(objects []byte) error) error {
	if a.err != nil {
		return a.err
	}
	if err := a.add(f, fn); err != nil {
		a.err = err
		a.Close()
		return err
	}
	if a.done {
		a.Close()
	}
	return nil
}

// Close stops the assembler's decoders. Call it when a response is abandoned before its end;
// one that ended (or failed) has closed them already.
func (a *ResponseAssembler) Close() {
	a.streams.closeAll()
}

func (a *ResponseAssembler) stream(id uint8) *inStream {
	s := a.streams.m[id]
	if s == nil {
		s = &inStream{}
		a.streams.m[id] = s
	}
	return s
}

// payload passes f's payload to fn, through the stream's decoder when the frame is encoded.
func (a *ResponseAssembler) payload(f Frame, fn func([]byte) error) error {
	if f.StreamFlags&StreamEncoded != 0 {
		if d := a.stream(f.StreamID).dec; d != nil {
			return d.feed(f.Payload, fn)
		}
	}
	if len(f.Payload) == 0 {
		return nil
	}
	return fn(f.Payload)
}

func discard([]byte) error { return nil }

func (a *ResponseAssembler) add(f Frame, fn func([]byte) error) error {
	if f.RequestID != a.RequestID && f.Type != TypeStreamSettings && f.Type != TypeErrorResponse {
		if a.done {
			return nil
		}
		// Another command's response on the same stream: its encoded bytes are part of the
		// stream's compression context.
		return a.payload(f, discard)
	}
	if a.done {
		return fmt.Errorf("%w: %s after end of stream", ErrUnexpectedFrame, f.Type)
	}
	switch f.Type {
	case TypeStreamSettings:
		return a.streamSettings(f)
	case TypeTextOutput, TypeProgress:
		return a.payload(f, discard)
	case TypeErrorResponse:
		var b []byte
		err := a.payload(f, func(p []byte) error {
			if len(b)+len(p) > maxStatusBytes {
				return fmt.Errorf("%w: error-response larger than %d bytes", ErrBadValue, maxStatusBytes)
			}
			b = append(b, p...)
			return nil
		})
		if err != nil {
			return fmt.Errorf("error-response: %w", err)
		}
		var e ErrorResponse
		if err := Unmarshal(b, &e); err != nil {
			return fmt.Errorf("error-response: %w", err)
		}
		a.done = true
		return fmt.Errorf("%w: %s: %s", ErrServerError, e.Type, e.Text())
	case TypeCommandResponse:
	default:
		return fmt.Errorf("%w: %s from a server", ErrUnexpectedFrame, f.Type)
	}
	c, e := f.Flags&FlagResponseContinuation != 0, f.Flags&FlagResponseEOS != 0
	if c == e {
		return fmt.Errorf("%w: command-response flags 0x%x", ErrBadFlags, f.Flags)
	}
	if err := a.payload(f, func(p []byte) error { return a.split(p, fn) }); err != nil {
		return err
	}
	if e {
		a.done = true
		if a.status == nil {
			return fmt.Errorf("%w: response ended inside the status value", ErrIncomplete)
		}
	}
	return nil
}

// split takes bytes of the response's CBOR stream: the status value first, then object bytes,
// which go to fn.
func (a *ResponseAssembler) split(data []byte, fn func([]byte) error) error {
	if a.status == nil {
		a.head = append(a.head, data...)
		var st Status
		rest, err := UnmarshalFirst(a.head, &st)
		if errors.Is(err, ErrIncomplete) {
			if len(a.head) > maxStatusBytes {
				return fmt.Errorf("%w: status value larger than %d bytes", ErrBadValue, maxStatusBytes)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("response status: %w", err)
		}
		if st.Status == "" {
			return fmt.Errorf("%w: response status map has no status", ErrBadValue)
		}
		a.status = &st
		a.head = nil
		data = rest
	}
	if len(data) == 0 {
		return nil
	}
	a.objects += int64(len(data))
	return fn(data)
}

// streamSettings reads a stream-settings frame (its payload may span frames: continuation, then
// end) and sets the stream's decoder. Like Mercurial's client, a new settings frame replaces the
// stream's decoder.
func (a *ResponseAssembler) streamSettings(f Frame) error {
	c, e := f.Flags&FlagSettingsContinuation != 0, f.Flags&FlagSettingsEOS != 0
	if c == e {
		return fmt.Errorf("%w: stream-settings flags 0x%x", ErrBadFlags, f.Flags)
	}
	s := a.stream(f.StreamID)
	if len(s.settings)+len(f.Payload) > maxSettingsBytes {
		return fmt.Errorf("%w: stream-settings larger than %d bytes", ErrBadValue, maxSettingsBytes)
	}
	s.settings = append(s.settings, f.Payload...)
	if c {
		return nil
	}
	payload := s.settings
	s.settings = nil
	var enc string
	rest, err := UnmarshalFirst(payload, &enc)
	if err != nil {
		return fmt.Errorf("stream-settings: %w", err)
	}
	if len(rest) > 0 {
		return fmt.Errorf("%w: stream-settings: encoding %q has no parameters, got %d more bytes", ErrBadValue, enc, len(rest))
	}
	d, err := newStreamDecoder(enc, a.Limits)
	if err != nil {
		return fmt.Errorf("server stream encoding: %w", err)
	}
	if s.dec != nil {
		s.dec.close()
	}
	s.dec = d
	return nil
}

// Status returns the response status once it has been read, else nil.
func (a *ResponseAssembler) Status() *Status { return a.status }

// Done says the end-of-stream frame (or an error-response) has been seen.
func (a *ResponseAssembler) Done() bool { return a.done }

// ObjectBytes is the number of object bytes (decoded) seen so far.
func (a *ResponseAssembler) ObjectBytes() int64 { return a.objects }

// Response is a client's view of one command response: the status, then the objects as a
// byte stream (decoded when the server encoded its stream). Frames are read and decoded as the
// objects are read, so memory stays bounded however much a frame decodes to.
type Response struct {
	fr      *Reader
	a       *ResponseAssembler
	next    func() (piece, bool)
	stop    func()
	pending []byte
	err     error
}

// piece is what a response's reading coroutine yields: object bytes (valid until the next pull),
// an error (io.EOF at the end), or neither when a frame has been read.
type piece struct {
	b   []byte
	err error
}

var errResponseClosed = errors.New("response closed")

// ReadResponse reads frames from a server until the response's status value is known.
// opts.Decode bounds what decoding an encoded stream may produce. A response abandoned before
// its end should be closed.
func ReadResponse(r io.Reader, requestID uint16, opts ReaderOptions) (*Response, error) {
	opts.Side = ClientSide
	if opts.MaxTotal == 0 {
		opts.MaxTotal = -1
	}
	fr, a := NewReader(r, opts), NewResponseAssembler(requestID)
	a.Limits = opts.Decode
	resp := &Response{fr: fr, a: a}
	resp.next, resp.stop = iter.Pull(func(yield func(piece) bool) {
		for !a.Done() {
			f, err := fr.Next()
			if err == io.EOF {
				err = fmt.Errorf("%w: no end-of-stream frame", ErrIncomplete)
			}
			if err != nil {
				a.Close()
				yield(piece{err: err})
				return
			}
			err = a.AddFunc(f, func(p []byte) error {
				if !yield(piece{b: p}) {
					return errResponseClosed
				}
				return nil
			})
			if err != nil {
				yield(piece{err: err})
				return
			}
			if !yield(piece{}) {
				return
			}
		}
		yield(piece{err: io.EOF})
	})
	runtime.AddCleanup(resp, func(stop func()) { stop() }, resp.stop)
	for a.Status() == nil {
		if err := resp.pull(); err != nil && (err != io.EOF || a.Status() == nil) {
			resp.Close()
			if err == io.EOF {
				err = fmt.Errorf("%w: response ended without a status", ErrIncomplete)
			}
			return nil, err
		}
	}
	return resp, nil
}

// pull advances the reading coroutine by one piece; object bytes land in pending.
func (r *Response) pull() error {
	if r.err != nil {
		return r.err
	}
	p, ok := r.next()
	switch {
	case !ok:
		r.err = errResponseClosed
	case p.err != nil:
		r.err = p.err
	case p.b == nil && r.a.Done():
		// The last frame: nothing is pending (a piece is pulled only once the previous one was
		// read), so the coroutine can end now rather than wait for one more pull.
		r.err = io.EOF
	default:
		r.pending = p.b
		return nil
	}
	r.stop()
	return r.err
}

// Close stops reading and decoding (the response's end does too).
func (r *Response) Close() {
	r.stop()
	r.a.Close()
}

// Status is the response's status value.
func (r *Response) Status() *Status { return r.a.Status() }

// ErrFrameAfterRedirect means a server sent more frames for a request after its redirect status.
// A real Mercurial client applies them to the fetched location body and corrupts it (spec section 6).
var ErrFrameAfterRedirect = errors.New("frame after the redirect status")

// CheckRedirectEnds verifies what Mercurial's client needs of a redirect: the frame that completed
// the status carried end-of-stream, and no frame for the request follows in the rest of the body.
func (r *Response) CheckRedirectEnds() error {
	if !r.a.Done() || len(r.pending) > 0 {
		return fmt.Errorf("%w: the status frame did not end the stream", ErrFrameAfterRedirect)
	}
	for {
		f, err := r.fr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if f.RequestID == r.a.RequestID {
			return fmt.Errorf("%w: %s", ErrFrameAfterRedirect, f.Type)
		}
	}
}

// Read reads the object bytes that follow the status (the concatenated CBOR objects).
func (r *Response) Read(p []byte) (int, error) {
	for len(r.pending) == 0 {
		if err := r.pull(); err != nil {
			return 0, err
		}
	}
	n := copy(p, r.pending)
	r.pending = r.pending[n:]
	return n, nil
}

// DecodeObjects splits a concatenation of CBOR values into decoded values.
func DecodeObjects(data []byte) ([]any, error) {
	var out []any
	for len(data) > 0 {
		var v any
		rest, err := UnmarshalFirst(data, &v)
		if err != nil {
			return out, fmt.Errorf("object %d: %w", len(out), err)
		}
		out = append(out, v)
		data = rest
	}
	return out, nil
}
