package wire

import (
	"bytes"
	"errors"
	"fmt"
	"io"
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
// to Add returns those the frame carried.
type ResponseAssembler struct {
	RequestID uint16
	status    *Status
	head      []byte
	done      bool
	objects   int64
}

// NewResponseAssembler follows responses to requestID.
func NewResponseAssembler(requestID uint16) *ResponseAssembler {
	return &ResponseAssembler{RequestID: requestID}
}

// maxStatusBytes bounds the bytes buffered while waiting for the status value to complete.
const maxStatusBytes = 1 << 20

// Add consumes one frame. It returns object bytes the frame carried (valid until the frame's
// buffer is reused). Frames of other requests are ignored, except error responses: a server that
// could not parse a request may not know its id.
func (a *ResponseAssembler) Add(f Frame) ([]byte, error) {
	if f.RequestID != a.RequestID && f.Type != TypeStreamSettings && f.Type != TypeErrorResponse {
		return nil, nil
	}
	if a.done {
		return nil, fmt.Errorf("%w: %s after end of stream", ErrUnexpectedFrame, f.Type)
	}
	switch f.Type {
	case TypeStreamSettings:
		var enc string
		if _, err := UnmarshalFirst(f.Payload, &enc); err != nil {
			return nil, fmt.Errorf("stream-settings: %w", err)
		}
		if enc != EncodingIdentity {
			return nil, fmt.Errorf("%w: server stream encoding %q", ErrUnsupportedEncoding, enc)
		}
		return nil, nil
	case TypeTextOutput, TypeProgress:
		return nil, nil
	case TypeErrorResponse:
		var e ErrorResponse
		if err := Unmarshal(f.Payload, &e); err != nil {
			return nil, fmt.Errorf("error-response: %w", err)
		}
		a.done = true
		return nil, fmt.Errorf("%w: %s: %s", ErrServerError, e.Type, e.Text())
	case TypeCommandResponse:
	default:
		return nil, fmt.Errorf("%w: %s from a server", ErrUnexpectedFrame, f.Type)
	}
	c, e := f.Flags&FlagResponseContinuation != 0, f.Flags&FlagResponseEOS != 0
	if c == e {
		return nil, fmt.Errorf("%w: command-response flags 0x%x", ErrBadFlags, f.Flags)
	}
	if e {
		a.done = true
	}
	data := f.Payload
	if a.status == nil {
		a.head = append(a.head, data...)
		var st Status
		rest, err := UnmarshalFirst(a.head, &st)
		if errors.Is(err, ErrIncomplete) {
			if len(a.head) > maxStatusBytes {
				return nil, fmt.Errorf("%w: status value larger than %d bytes", ErrBadValue, maxStatusBytes)
			}
			if a.done {
				return nil, fmt.Errorf("%w: response ended inside the status value", ErrIncomplete)
			}
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("response status: %w", err)
		}
		if st.Status == "" {
			return nil, fmt.Errorf("%w: response status map has no status", ErrBadValue)
		}
		a.status = &st
		a.head = nil
		data = rest
	}
	a.objects += int64(len(data))
	return data, nil
}

// Status returns the response status once it has been read, else nil.
func (a *ResponseAssembler) Status() *Status { return a.status }

// Done says the end-of-stream frame (or an error-response) has been seen.
func (a *ResponseAssembler) Done() bool { return a.done }

// ObjectBytes is the number of object bytes seen so far.
func (a *ResponseAssembler) ObjectBytes() int64 { return a.objects }

// Response is a client's view of one command response: the status, then the objects as a
// byte stream.
type Response struct {
	fr      *Reader
	a       *ResponseAssembler
	pending []byte
	err     error
}

// ReadResponse reads frames from a server until the response's status value is known.
func ReadResponse(r io.Reader, requestID uint16, opts ReaderOptions) (*Response, error) {
	opts.Side = ClientSide
	if opts.MaxTotal == 0 {
		opts.MaxTotal = -1
	}
	resp := &Response{fr: NewReader(r, opts), a: NewResponseAssembler(requestID)}
	for resp.a.Status() == nil {
		if err := resp.step(); err != nil {
			return nil, err
		}
	}
	return resp, nil
}

func (r *Response) step() error {
	if r.a.Done() {
		return io.EOF
	}
	f, err := r.fr.Next()
	if err == io.EOF {
		return fmt.Errorf("%w: no end-of-stream frame", ErrIncomplete)
	}
	if err != nil {
		return err
	}
	data, err := r.a.Add(f)
	if err != nil {
		return err
	}
	r.pending = append(r.pending[:0], data...)
	return nil
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
		if r.err != nil {
			return 0, r.err
		}
		r.err = r.step()
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
