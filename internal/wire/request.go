package wire

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/fxamacker/cbor/v2"
)

// RedirectRequest is the client's `redirect` map: the targets it accepts in the server's order, and
// the hash algorithms it knows.
type RedirectRequest struct {
	Hashes  []string `cbor:"hashes"`
	Targets []string `cbor:"targets"`
}

// CommandRequest is one assembled command request.
type CommandRequest struct {
	RequestID uint16
	StreamID  uint8
	Name      string
	// Args as decoded: byte strings are Go strings, maps map[string]any, sets cbor.Tag 258.
	Args map[string]any
	// RawArgs is the encoded `args` value as the client sent it (nil when absent).
	RawArgs RawMessage
	// Redirect is nil when the client sent no `redirect` map.
	Redirect *RedirectRequest
	// Data is the command data that followed the request, if any.
	Data []byte
	// HasData says the request announced command data.
	HasData bool
}

// commandRequestMap is the request payload, fields in Mercurial's key order.
type commandRequestMap struct {
	Args     RawMessage       `cbor:"args,omitempty"`
	Name     string           `cbor:"name"`
	Redirect *RedirectRequest `cbor:"redirect,omitempty"`
}

type senderSettings struct {
	ContentEncodings []string `cbor:"contentencodings"`
}

// RequestStream is what a client sent in one request body: its protocol settings and its
// commands.
type RequestStream struct {
	ContentEncodings []string
	Commands         []*CommandRequest
}

// ReadRequest reads a whole client request body (frames from a client) and assembles its command
// requests. Frames of other types than a client may send are errors.
func ReadRequest(r io.Reader, opts ReaderOptions) (*RequestStream, error) {
	opts.Side = ServerSide
	fr := NewReader(r, opts)
	a := newRequestAssembler()
	for {
		f, err := fr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		if err := a.add(f); err != nil {
			return nil, err
		}
	}
	return a.finish()
}

type pendingRequest struct {
	req     *CommandRequest
	payload bytes.Buffer
	more    bool // more command-request frames expected
	data    bool // command-data frames expected
}

type requestAssembler struct {
	out          RequestStream
	settings     bytes.Buffer
	settingsDone bool
	settingsOpen bool
	pending      map[uint16]*pendingRequest
	seen         map[uint16]bool
	encodings    map[uint8]bool // streams with stream-settings received
}

func newRequestAssembler() *requestAssembler {
	return &requestAssembler{pending: map[uint16]*pendingRequest{}, seen: map[uint16]bool{}, encodings: map[uint8]bool{}}
}

func (a *requestAssembler) add(f Frame) error {
	switch f.Type {
	case TypeSenderProtocolSettings:
		return a.addSettings(f)
	case TypeStreamSettings:
		var enc string
		if _, err := UnmarshalFirst(f.Payload, &enc); err != nil {
			return fmt.Errorf("stream-settings: %w", err)
		}
		if enc != EncodingIdentity {
			return fmt.Errorf("%w: client stream encoding %q", ErrUnsupportedEncoding, enc)
		}
		a.encodings[f.StreamID] = true
		return nil
	case TypeCommandRequest:
		return a.addRequest(f)
	case TypeCommandData:
		return a.addData(f)
	}
	return fmt.Errorf("%w: %s from a client", ErrUnexpectedFrame, f.Type)
}

func (a *requestAssembler) addSettings(f Frame) error {
	if a.settingsDone {
		return fmt.Errorf("%w: second sender-protocol-settings", ErrUnexpectedFrame)
	}
	if len(a.seen) > 0 {
		return fmt.Errorf("%w: sender-protocol-settings after a command request", ErrUnexpectedFrame)
	}
	c, e := f.Flags&FlagSettingsContinuation != 0, f.Flags&FlagSettingsEOS != 0
	if c == e || f.Flags&^(FlagSettingsContinuation|FlagSettingsEOS) != 0 {
		return fmt.Errorf("%w: sender-protocol-settings flags 0x%x", ErrBadFlags, f.Flags)
	}
	a.settingsOpen = true
	a.settings.Write(f.Payload)
	if c {
		return nil
	}
	a.settingsDone, a.settingsOpen = true, false
	var s senderSettings
	if err := Unmarshal(a.settings.Bytes(), &s); err != nil {
		return fmt.Errorf("sender-protocol-settings: %w", err)
	}
	if len(s.ContentEncodings) == 0 {
		return fmt.Errorf("%w: sender-protocol-settings: contentencodings is empty", ErrBadValue)
	}
	a.out.ContentEncodings = s.ContentEncodings
	return nil
}

func (a *requestAssembler) addRequest(f Frame) error {
	if a.settingsOpen {
		return fmt.Errorf("%w: command-request before sender-protocol-settings ended", ErrUnexpectedFrame)
	}
	isNew, isCont := f.Flags&FlagRequestNew != 0, f.Flags&FlagRequestContinuation != 0
	if isNew == isCont {
		return fmt.Errorf("%w: command-request flags 0x%x need exactly one of new or continuation", ErrBadFlags, f.Flags)
	}
	p := a.pending[f.RequestID]
	if isNew {
		if a.seen[f.RequestID] {
			return fmt.Errorf("%w: request id %d used twice", ErrUnexpectedFrame, f.RequestID)
		}
		a.seen[f.RequestID] = true
		p = &pendingRequest{req: &CommandRequest{RequestID: f.RequestID, StreamID: f.StreamID}}
		a.pending[f.RequestID] = p
	} else if p == nil || !p.more {
		return fmt.Errorf("%w: request id %d", ErrContinuation, f.RequestID)
	}
	p.payload.Write(f.Payload)
	p.more = f.Flags&FlagRequestMore != 0
	if f.Flags&FlagRequestHaveData != 0 {
		p.data = true
		p.req.HasData = true
	}
	if p.more {
		return nil
	}
	if err := decodeCommandRequest(p.payload.Bytes(), p.req); err != nil {
		return err
	}
	if !p.data {
		return a.complete(f.RequestID)
	}
	return nil
}

func (a *requestAssembler) addData(f Frame) error {
	p := a.pending[f.RequestID]
	if p == nil || p.more || !p.data {
		return fmt.Errorf("%w: command-data for request id %d that expects none", ErrUnexpectedFrame, f.RequestID)
	}
	c, e := f.Flags&FlagDataContinuation != 0, f.Flags&FlagDataEOS != 0
	if c == e {
		return fmt.Errorf("%w: command-data flags 0x%x", ErrBadFlags, f.Flags)
	}
	p.req.Data = append(p.req.Data, f.Payload...)
	if e {
		return a.complete(f.RequestID)
	}
	return nil
}

func (a *requestAssembler) complete(id uint16) error {
	a.out.Commands = append(a.out.Commands, a.pending[id].req)
	delete(a.pending, id)
	return nil
}

func (a *requestAssembler) finish() (*RequestStream, error) {
	if a.settingsOpen {
		return nil, fmt.Errorf("%w: sender-protocol-settings not ended", ErrIncomplete)
	}
	for id := range a.pending {
		return nil, fmt.Errorf("%w: request id %d", ErrIncomplete, id)
	}
	return &a.out, nil
}

// DecodeCommandRequest decodes one command-request payload (the CBOR map).
func DecodeCommandRequest(payload []byte) (*CommandRequest, error) {
	req := &CommandRequest{}
	if err := decodeCommandRequest(payload, req); err != nil {
		return nil, err
	}
	return req, nil
}

// commandRequestIn is a command-request payload as read: one pass over the map, with the values
// kept raw until each is checked, unknown and duplicate keys refused by strictMode.
type commandRequestIn struct {
	Args     RawMessage `cbor:"args"`
	Name     RawMessage `cbor:"name"`
	Redirect RawMessage `cbor:"redirect"`
}

func decodeCommandRequest(payload []byte, req *CommandRequest) error {
	var in commandRequestIn
	if err := unmarshalStrict(payload, &in); err != nil {
		return fmt.Errorf("command request: %w", nameUnknownKey(payload, err, "name", "args", "redirect"))
	}
	if in.Name == nil {
		return fmt.Errorf("%w: command request: missing name", ErrBadValue)
	}
	if err := Unmarshal(in.Name, &req.Name); err != nil {
		return fmt.Errorf("command request: name: %w", err)
	}
	if req.Name == "" {
		return fmt.Errorf("%w: command request: name is empty", ErrBadValue)
	}
	if in.Args != nil {
		if err := Unmarshal(in.Args, &req.Args); err != nil {
			return fmt.Errorf("command request: args: %w", err)
		}
		if req.Args == nil {
			return fmt.Errorf("%w: command request: args is not a map", ErrBadValue)
		}
		req.RawArgs = in.Args
	}
	if in.Redirect != nil {
		var rr RedirectRequest
		if err := decodeStrict(in.Redirect, &rr); err != nil {
			return fmt.Errorf("command request: redirect: %w", err)
		}
		if rr.Targets == nil {
			rr.Targets = []string{}
		}
		req.Redirect = &rr
	}
	return nil
}

// decodeStrict decodes a map into a struct, refusing keys the struct does not name (compared
// case-sensitively) and a value that is not a map.
func decodeStrict(raw []byte, v any) error {
	if len(raw) == 0 || raw[0]>>5 != majorMap {
		return fmt.Errorf("%w: not a map", ErrBadValue)
	}
	if err := unmarshalStrict(raw, v); err != nil {
		return nameUnknownKey(raw, err, "targets", "hashes")
	}
	return nil
}

// nameUnknownKey turns the library's "unknown field at index N" into an error naming the key,
// reading the map again (only on that error path).
func nameUnknownKey(raw []byte, err error, known ...string) error {
	var uf *cbor.UnknownFieldError
	if !errors.As(err, &uf) {
		return err
	}
	var m map[string]RawMessage
	if Unmarshal(raw, &m) == nil {
		for k := range m {
			if !slices.Contains(known, k) {
				return fmt.Errorf("%w: unknown key %q", ErrBadValue, k)
			}
		}
	}
	return err
}

// EncodeCommandRequest returns the CBOR payload of req (name, args, redirect).
func EncodeCommandRequest(req *CommandRequest) ([]byte, error) {
	m := commandRequestMap{Name: req.Name, Redirect: req.Redirect, Args: req.RawArgs}
	if m.Args == nil && len(req.Args) > 0 {
		b, err := Marshal(req.Args)
		if err != nil {
			return nil, fmt.Errorf("encode args: %w", err)
		}
		m.Args = b
	}
	return encMode.Marshal(m)
}

// RequestWriter writes a client's request frames on one stream.
type RequestWriter struct {
	w        *Writer
	streamID uint8
	begun    bool
}

// NewRequestWriter returns a writer for client stream 1.
func NewRequestWriter(w io.Writer) *RequestWriter {
	return &RequestWriter{w: NewWriter(w, DefaultMaxPayload), streamID: 1}
}

func (rw *RequestWriter) streamFlags() uint8 {
	if rw.begun {
		return 0
	}
	rw.begun = true
	return StreamBegin
}

// WriteSettings writes a sender-protocol-settings frame naming the content encodings the client
// accepts, in preference order.
func (rw *RequestWriter) WriteSettings(encodings ...string) error {
	b, err := encMode.Marshal(senderSettings{ContentEncodings: encodings})
	if err != nil {
		return err
	}
	return rw.w.WriteSplit(Frame{RequestID: 1, StreamID: rw.streamID, StreamFlags: rw.streamFlags(),
		Type: TypeSenderProtocolSettings}, b, FlagSettingsContinuation, FlagSettingsEOS)
}

// WriteCommand writes req as command-request frames (and command-data frames if it has data).
func (rw *RequestWriter) WriteCommand(req *CommandRequest) error {
	b, err := EncodeCommandRequest(req)
	if err != nil {
		return err
	}
	hasData := req.HasData || len(req.Data) > 0
	f := Frame{RequestID: req.RequestID, StreamID: rw.streamID, StreamFlags: rw.streamFlags(), Type: TypeCommandRequest}
	var dataFlag uint8
	if hasData {
		dataFlag = FlagRequestHaveData
	}
	// First frame carries "new"; later ones "continuation".
	first := true
	for {
		chunk := b
		more := len(chunk) > rw.w.maxPayload
		if more {
			chunk = chunk[:rw.w.maxPayload]
		}
		flags := dataFlag
		if first {
			flags |= FlagRequestNew
		} else {
			flags |= FlagRequestContinuation
		}
		if more {
			flags |= FlagRequestMore
		}
		f.Flags, f.Payload = flags, chunk
		if err := rw.w.WriteFrame(f); err != nil {
			return err
		}
		f.StreamFlags = 0
		first = false
		b = b[len(chunk):]
		if !more {
			break
		}
	}
	if !hasData {
		return nil
	}
	return rw.w.WriteSplit(Frame{RequestID: req.RequestID, StreamID: rw.streamID, Type: TypeCommandData},
		req.Data, FlagDataContinuation, FlagDataEOS)
}
