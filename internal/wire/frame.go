package wire

import (
	"errors"
	"fmt"
	"io"
)

// FrameType is the high nibble of a frame header's last byte.
type FrameType uint8

// Frame types of wire protocol v2.
const (
	TypeCommandRequest         FrameType = 0x1
	TypeCommandData            FrameType = 0x2
	TypeCommandResponse        FrameType = 0x3
	TypeErrorResponse          FrameType = 0x5
	TypeTextOutput             FrameType = 0x6
	TypeProgress               FrameType = 0x7
	TypeSenderProtocolSettings FrameType = 0x8
	TypeStreamSettings         FrameType = 0x9
)

func (t FrameType) String() string {
	switch t {
	case TypeCommandRequest:
		return "command-request"
	case TypeCommandData:
		return "command-data"
	case TypeCommandResponse:
		return "command-response"
	case TypeErrorResponse:
		return "error-response"
	case TypeTextOutput:
		return "text-output"
	case TypeProgress:
		return "progress"
	case TypeSenderProtocolSettings:
		return "sender-protocol-settings"
	case TypeStreamSettings:
		return "stream-settings"
	}
	return fmt.Sprintf("frame-type-0x%x", uint8(t))
}

func (t FrameType) known() bool {
	return t >= TypeCommandRequest && t <= TypeStreamSettings && t != 0x4
}

// Stream flags (header byte 6).
const (
	StreamBegin   uint8 = 0x01
	StreamEnd     uint8 = 0x02
	StreamEncoded uint8 = 0x04
)

// Frame flags (low nibble of header byte 7); their meaning depends on the frame type.
const (
	FlagRequestNew          uint8 = 0x01
	FlagRequestContinuation uint8 = 0x02
	FlagRequestMore         uint8 = 0x04
	FlagRequestHaveData     uint8 = 0x08

	FlagDataContinuation uint8 = 0x01
	FlagDataEOS          uint8 = 0x02

	FlagResponseContinuation uint8 = 0x01
	FlagResponseEOS          uint8 = 0x02

	FlagSettingsContinuation uint8 = 0x01
	FlagSettingsEOS          uint8 = 0x02
)

// HeaderSize is the length of a frame header in bytes.
const HeaderSize = 8

// Limits.
const (
	// DefaultMaxPayload is the largest frame payload Mercurial sends by default.
	DefaultMaxPayload = 32768
	// MaxPayloadLimit is what the 24-bit length field can express.
	MaxPayloadLimit = 1<<24 - 1
	// DefaultMaxRequest bounds the bytes of all frames of one request body.
	DefaultMaxRequest = 4 << 20
)

// Sentinel errors; every error this package returns for bad input wraps one of them.
var (
	ErrTruncated           = errors.New("truncated frame")
	ErrPayloadTooLarge     = errors.New("frame payload exceeds limit")
	ErrRequestTooLarge     = errors.New("request exceeds size limit")
	ErrStreamParity        = errors.New("frame on a stream of the wrong parity")
	ErrStreamNotBegun      = errors.New("first frame of a stream lacks begin-stream")
	ErrUnknownFrameType    = errors.New("unknown frame type")
	ErrUnexpectedFrame     = errors.New("unexpected frame")
	ErrBadFlags            = errors.New("invalid frame flags")
	ErrContinuation        = errors.New("continuation without a new request")
	ErrBadCBOR             = errors.New("malformed CBOR")
	ErrBadValue            = errors.New("CBOR value of the wrong shape")
	ErrUnsupportedEncoding = errors.New("unsupported content encoding")
	ErrIncomplete          = errors.New("stream ended before the request or response was complete")
)

// Frame is one decoded frame. Payload aliases the reader's buffer only until the next call to
// Reader.Next; copy it to keep it.
type Frame struct {
	RequestID   uint16
	StreamID    uint8
	StreamFlags uint8
	Type        FrameType
	Flags       uint8
	Payload     []byte
}

func (f Frame) String() string {
	return fmt.Sprintf("%s request=%d stream=%d sflags=0x%x flags=0x%x len=%d",
		f.Type, f.RequestID, f.StreamID, f.StreamFlags, f.Flags, len(f.Payload))
}

// Header is the fixed 8-byte part of a frame.
type Header struct {
	Length      int
	RequestID   uint16
	StreamID    uint8
	StreamFlags uint8
	Type        FrameType
	Flags       uint8
}

// ParseHeader decodes an 8-byte frame header. It does not judge the values.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, fmt.Errorf("%w: header has %d of %d bytes", ErrTruncated, len(b), HeaderSize)
	}
	return Header{
		Length:      int(b[0]) | int(b[1])<<8 | int(b[2])<<16,
		RequestID:   uint16(b[3]) | uint16(b[4])<<8,
		StreamID:    b[5],
		StreamFlags: b[6],
		Type:        FrameType(b[7] >> 4),
		Flags:       b[7] & 0x0f,
	}, nil
}

// AppendFrame appends the encoding of f to dst. The payload must fit the 24-bit length field.
func AppendFrame(dst []byte, f Frame) []byte {
	n := len(f.Payload)
	dst = append(dst, byte(n), byte(n>>8), byte(n>>16),
		byte(f.RequestID), byte(f.RequestID>>8),
		f.StreamID, f.StreamFlags, byte(f.Type)<<4|f.Flags&0x0f)
	return append(dst, f.Payload...)
}

// Side says which end of a connection a Reader sits at, and so which stream parity it accepts.
type Side int

const (
	// ServerSide reads frames a client sent: odd stream ids.
	ServerSide Side = iota
	// ClientSide reads frames a server sent: even stream ids.
	ClientSide
)

// ReaderOptions bound what a Reader accepts. Zero fields take defaults.
type ReaderOptions struct {
	Side       Side
	MaxPayload int   // per frame; default DefaultMaxPayload
	MaxTotal   int64 // all frames together; default DefaultMaxRequest, negative for no limit
	// Decode bounds what decoding an encoded response may produce (ReadResponse only).
	Decode DecodeLimits
}

// Reader reads frames from an io.Reader, checking lengths, stream parity, begin-stream and frame
// types as it goes.
type Reader struct {
	r     io.Reader
	opts  ReaderOptions
	total int64
	hdr   [HeaderSize]byte
	buf   []byte
	begun [256]bool
	hdrOK bool
	raw   []byte
}

// NewReader returns a Reader over r.
func NewReader(r io.Reader, opts ReaderOptions) *Reader {
	if opts.MaxPayload <= 0 {
		opts.MaxPayload = DefaultMaxPayload
	}
	if opts.MaxPayload > MaxPayloadLimit {
		opts.MaxPayload = MaxPayloadLimit
	}
	if opts.MaxTotal == 0 {
		opts.MaxTotal = DefaultMaxRequest
	}
	return &Reader{r: r, opts: opts}
}

// Next returns the next frame. At a clean end of input (between frames) it returns io.EOF.
func (r *Reader) Next() (Frame, error) {
	r.hdrOK = false
	n, err := io.ReadFull(r.r, r.hdr[:])
	if err == io.EOF {
		return Frame{}, io.EOF
	}
	if err != nil {
		if err == io.ErrUnexpectedEOF {
			return Frame{}, fmt.Errorf("%w: header has %d of %d bytes", ErrTruncated, n, HeaderSize)
		}
		return Frame{}, err
	}
	h, _ := ParseHeader(r.hdr[:])
	if h.Length > r.opts.MaxPayload {
		return Frame{}, fmt.Errorf("%w: %d bytes, limit %d", ErrPayloadTooLarge, h.Length, r.opts.MaxPayload)
	}
	r.total += int64(HeaderSize + h.Length)
	if r.opts.MaxTotal > 0 && r.total > r.opts.MaxTotal {
		return Frame{}, fmt.Errorf("%w: more than %d bytes", ErrRequestTooLarge, r.opts.MaxTotal)
	}
	if !h.Type.known() {
		return Frame{}, fmt.Errorf("%w: 0x%x", ErrUnknownFrameType, uint8(h.Type))
	}
	wantOdd := r.opts.Side == ServerSide
	if (h.StreamID%2 == 1) != wantOdd {
		return Frame{}, fmt.Errorf("%w: stream %d", ErrStreamParity, h.StreamID)
	}
	if !r.begun[h.StreamID] {
		if h.StreamFlags&StreamBegin == 0 {
			return Frame{}, fmt.Errorf("%w: stream %d", ErrStreamNotBegun, h.StreamID)
		}
		r.begun[h.StreamID] = true
	}
	if cap(r.buf) < h.Length {
		r.buf = make([]byte, h.Length)
	}
	r.buf = r.buf[:h.Length]
	if m, err := io.ReadFull(r.r, r.buf); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return Frame{}, fmt.Errorf("%w: payload has %d of %d bytes", ErrTruncated, m, h.Length)
		}
		return Frame{}, err
	}
	r.hdrOK = true
	return Frame{
		RequestID:   h.RequestID,
		StreamID:    h.StreamID,
		StreamFlags: h.StreamFlags,
		Type:        h.Type,
		Flags:       h.Flags,
		Payload:     r.buf,
	}, nil
}

// Raw returns the encoded bytes of the frame the last Next returned, valid until the next call.
// Proxies use it to relay a frame as it came; only they pay for the copy.
func (r *Reader) Raw() []byte {
	if !r.hdrOK {
		return nil
	}
	r.raw = append(append(r.raw[:0], r.hdr[:]...), r.buf...)
	return r.raw
}

// Writer writes frames, splitting payloads larger than its maximum.
type Writer struct {
	w          io.Writer
	maxPayload int
	buf        []byte
}

// NewWriter returns a Writer that emits payloads of at most maxPayload bytes (DefaultMaxPayload if
// maxPayload <= 0).
func NewWriter(w io.Writer, maxPayload int) *Writer {
	if maxPayload <= 0 || maxPayload > MaxPayloadLimit {
		maxPayload = DefaultMaxPayload
	}
	return &Writer{w: w, maxPayload: maxPayload}
}

// WriteFrame writes f as one frame. Its payload must fit the writer's maximum.
func (w *Writer) WriteFrame(f Frame) error {
	if len(f.Payload) > w.maxPayload {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrPayloadTooLarge, len(f.Payload), w.maxPayload)
	}
	w.buf = AppendFrame(w.buf[:0], f)
	_, err := w.w.Write(w.buf)
	return err
}

// WriteSplit writes payload as a run of frames like f, each at most the writer's maximum. Every
// frame but the last carries moreFlags, the last carries lastFlags. An empty payload is one frame.
func (w *Writer) WriteSplit(f Frame, payload []byte, moreFlags, lastFlags uint8) error {
	for {
		chunk := payload
		flags := lastFlags
		if len(chunk) > w.maxPayload {
			chunk = chunk[:w.maxPayload]
			flags = moreFlags
		}
		f.Payload = chunk
		f.Flags = flags
		if err := w.WriteFrame(f); err != nil {
			return err
		}
		payload = payload[len(chunk):]
		if len(payload) == 0 {
			return nil
		}
		// Only the first frame of a stream carries begin-stream.
		f.StreamFlags &^= StreamBegin
	}
}
