package hgv2

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/wire"
)

// relayBufferSize is the unit the relay reads the origin's answer in.
const relayBufferSize = 64 << 10

var errClientGone = errors.New("client went away")

// relayWithFill streams the origin's response to the client frame by frame and, beside it, the
// response's CBOR objects into the fill. The client never waits on the store. The fill ends here,
// whatever happens: complete, or failed with the reason.
func (f *Front) relayWithFill(w http.ResponseWriter, r *http.Request, cmd *wire.CommandRequest, fill *agent.FillWriter) {
	defer fill.Finish()
	resp, err := f.forwardCommand(r, cmd)
	if err != nil {
		fill.Fail(fmt.Errorf("origin unreachable: %w", err))
		f.originFailed(w, cmd, err)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fill.Fail(fmt.Errorf("origin answered HTTP %d", resp.StatusCode))
		copyResponse(w, resp)
		return
	}
	for k, vs := range resp.Header {
		if k != "Content-Length" {
			w.Header()[k] = vs
		}
	}
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)

	// Frames are flushed to the client when no more of the origin's answer is already at hand:
	// as fast as the origin sends, without a flush (and a write syscall) per frame.
	body := bufio.NewReaderSize(resp.Body, relayBufferSize)
	fr := wire.NewReader(body, wire.ReaderOptions{Side: wire.ClientSide, MaxPayload: wire.MaxPayloadLimit, MaxTotal: -1})
	asm := wire.NewResponseAssembler(cmd.RequestID)
	for {
		frame, err := fr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			fill.Fail(fmt.Errorf("origin response: %w", err))
			return
		}
		if _, err := w.Write(fr.Raw()); err != nil {
			fill.Fail(errClientGone)
			return
		}
		if flusher != nil && body.Buffered() == 0 {
			flusher.Flush()
		}
		data, err := asm.Add(frame)
		if err != nil {
			fill.Fail(fmt.Errorf("origin response: %w", err))
			continue
		}
		fill.Offer(data)
	}
	switch {
	case !asm.Done():
		fill.Fail(errors.New("origin response ended without end-of-stream"))
	case asm.Status() == nil || asm.Status().Status != wire.StatusOK:
		fill.Fail(errors.New("origin answered with a non-ok status"))
	}
}
