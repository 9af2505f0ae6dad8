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

// errCut is an origin answer that broke off after its relay had begun (the client may have been
// sent none of it yet: frames are flushed when no more are at hand).
var errCut = errors.New("the origin's answer broke off")

// cutIfBroken ends the client's connection when its answer broke off: a relayed answer ended
// cleanly would tell an HTTP client it was complete. Call it after the relay's error is handled
// (a fill failed with it): it does not return then.
func cutIfBroken(err error) {
	if errors.Is(err, errCut) {
		panic(http.ErrAbortHandler)
	}
}

// relayWithFill relays the origin's answer to cmd and, beside it, stores the response's CBOR
// objects in the fill: decoded when the origin encoded them, so that the object is exactly what a
// redirect serves. The client never waits on the store, and a fill that fails (decoding included)
// does not stop the relay. The fill ends here, whatever happens.
func (f *Front) relayWithFill(w http.ResponseWriter, r *http.Request, cmd *wire.CommandRequest, encodings []string, fill *agent.FillWriter) {
	defer fill.Finish()
	err := f.relayCommand(w, r, cmd, encodings, func(objects []byte) error {
		fill.Offer(objects)
		return fill.Failed()
	})
	if err != nil {
		fill.Fail(err)
	}
	cutIfBroken(err) // (fill.Finish runs first, and finds the fill failed)
}

// relayCommand asks the origin for cmd in the content encodings the client offered that the front
// decodes (wire.UpstreamEncodings), and relays the origin's frames to the client as they come,
// unchanged (compressed, if the origin compressed them): a miss costs the origin and the client
// what the same request made directly costs. Beside the relay it passes the response's object
// bytes, decoded, to objects (pieces valid only during the call) until objects returns an error,
// which ends the decoding, not the relay. It returns why the response is not complete and ok, or
// why its objects could not be followed to the end (nil: they were). The bytes relayed are
// counted as the origin's.
func (f *Front) relayCommand(w http.ResponseWriter, r *http.Request, cmd *wire.CommandRequest, encodings []string, objects func([]byte) error) error {
	cw := f.a.OriginWriter(w, commandLabel(cmd.Name))
	resp, err := f.forwardCommand(r, cmd, wire.UpstreamEncodings(encodings))
	if err != nil {
		f.originFailed(cw, cmd, err)
		return fmt.Errorf("origin unreachable: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		copyResponse(cw, resp)
		return fmt.Errorf("origin answered HTTP %d", resp.StatusCode)
	}
	for k, vs := range resp.Header {
		if k != "Content-Length" {
			cw.Header()[k] = vs
		}
	}
	cw.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)

	// Frames are flushed to the client when no more of the origin's answer is already at hand:
	// as fast as the origin sends, without a flush (and a write syscall) per frame.
	body := bufio.NewReaderSize(resp.Body, relayBufferSize)
	fr := wire.NewReader(body, wire.ReaderOptions{Side: wire.ClientSide, MaxPayload: wire.MaxPayloadLimit, MaxTotal: -1})
	asm := wire.NewResponseAssembler(cmd.RequestID)
	defer asm.Close()
	var following error // why the objects are no longer followed
	for {
		frame, err := fr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("origin response: %w: %w", errCut, err)
		}
		// The objects are followed before the frame goes on, so that what a caller learns from
		// them is in place before the client can have the answer and ask again.
		if following == nil {
			if err := asm.AddFunc(frame, objects); err != nil {
				following = err
				asm.Close()
			}
		}
		if _, err := cw.Write(fr.Raw()); err != nil {
			return errClientGone
		}
		if flusher != nil && body.Buffered() == 0 {
			flusher.Flush()
		}
	}
	switch {
	case following != nil:
		return fmt.Errorf("origin response: %w", following)
	case !asm.Done():
		// (A close-delimited answer that dropped between frames ends so too.)
		return fmt.Errorf("origin response ended without end-of-stream: %w", errCut)
	case asm.Status() == nil || asm.Status().Status != wire.StatusOK:
		return errors.New("origin answered with a non-ok status")
	}
	return nil
}

// relayObservingSize relays a clone's changesetdata (the whole DAG) like any inline answer, and
// learns the repository's size from the first object of the answer.
func (f *Front) relayObservingSize(w http.ResponseWriter, r *http.Request, cmd *wire.CommandRequest, encodings []string) {
	f.a.Count("passthrough")
	var t totalItems
	err := f.relayCommand(w, r, cmd, encodings, func(p []byte) error {
		err := t.observe(p)
		if errors.Is(err, errStopObserving) && t.n > 0 {
			// Learned before the frame that told it reaches the client (relayCommand follows
			// objects first), so the client's next handshake already advertises the new size.
			repo := repoOf(r.URL.Path)
			before := f.sizes.known(repo)
			f.sizes.learn(repo, t.n, "clone")
			if b := BatchSizeFor(t.n); before > 0 && b != BatchSizeFor(before) {
				f.a.Log().Info("repository size changes the batch size", "repo", repo, "changesets", t.n, "batch_size", b,
					"was", BatchSizeFor(before))
			}
		}
		return err
	})
	cutIfBroken(err)
}
