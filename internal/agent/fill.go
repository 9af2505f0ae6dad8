package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/wire"
)

var (
	errFillBehind = errors.New("store fell too far behind the client")
	errOverBudget = errors.New("all fills together hold as many bytes as the agent allows")
	errClientGone = errors.New("client went away")
)

// storeError marks a fill's failure as the store's (an upload that failed), which the target's
// breaker counts; other failures (client, origin, budget) say nothing about the store.
type storeError struct{ err error }

func (e *storeError) Error() string { return e.err.Error() }
func (e *storeError) Unwrap() error { return e.err }

// serveInlineWithFill streams the origin's response to the client frame by frame and, beside it,
// the response's CBOR objects into the granted target. The client never waits on the store.
func (a *Agent) serveInlineWithFill(w http.ResponseWriter, r *http.Request, cmd *wire.CommandRequest, key string, grant *pb.FillGrant) {
	a.metrics.requests.WithLabelValues("inline_fill").Inc()
	resp, err := a.forwardCommand(r, cmd)
	if err != nil {
		a.endFill(grant.Target, nil)
		a.originFailed(w, cmd, err)
		a.abortFill(key, grant.Token, "origin unreachable")
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		a.endFill(grant.Target, nil)
		copyResponse(w, resp)
		a.abortFill(key, grant.Token, fmt.Sprintf("origin answered HTTP %d", resp.StatusCode))
		return
	}
	for k, vs := range resp.Header {
		if k != "Content-Length" {
			w.Header()[k] = vs
		}
	}
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)

	f := a.startFill(key, grant)
	// Frames are flushed to the client when no more of the origin's answer is already at hand:
	// as fast as the origin sends, without a flush (and a write syscall) per frame.
	body := bufio.NewReaderSize(resp.Body, relayBufferSize)
	fr := wire.NewReader(body, wire.ReaderOptions{Side: wire.ClientSide, MaxPayload: wire.MaxPayloadLimit, MaxTotal: -1})
	asm := wire.NewResponseAssembler(cmd.RequestID)
	var relayErr error
	for {
		frame, err := fr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			relayErr = fmt.Errorf("origin response: %w", err)
			break
		}
		if _, err := w.Write(fr.Raw()); err != nil {
			relayErr = errClientGone
			break
		}
		if flusher != nil && body.Buffered() == 0 {
			flusher.Flush()
		}
		data, err := asm.Add(frame)
		if err != nil {
			f.fail(fmt.Errorf("origin response: %w", err))
			continue
		}
		if len(data) > 0 {
			f.offer(data)
		}
	}
	a.metrics.inlineBytes.Add(float64(asm.ObjectBytes()))
	switch {
	case relayErr != nil:
		f.fail(relayErr)
	case !asm.Done():
		f.fail(errors.New("origin response ended without end-of-stream"))
	case asm.Status() == nil || asm.Status().Status != wire.StatusOK:
		f.fail(errors.New("origin answered with a non-ok status"))
	case asm.ObjectBytes() == 0:
		f.fail(errors.New("response has no objects"))
	}
	f.finish()
}

// filler copies object bytes to an upload on its own goroutine, through a bounded queue.
type filler struct {
	a         *Agent
	key       string
	mediaType string
	grant     *pb.FillGrant
	up        *blob.Upload
	ch        chan []byte
	queued    atomic.Int64
	done      chan struct{}
	cancel    context.CancelFunc
	mu        sync.Mutex
	err       error
}

func (a *Agent) startFill(key string, grant *pb.FillGrant) *filler {
	// The claim ends at its TTL and a report after that is refused, so the upload gets no longer.
	ttl := grant.Ttl.AsDuration()
	if ttl <= 0 {
		ttl = time.Minute
	}
	ctx, cancel := context.WithTimeout(a.fillCtx, ttl)
	mediaType := grant.MediaType
	if mediaType == "" {
		mediaType = wire.MediaTypeCBOR
	}
	f := &filler{a: a, key: key, grant: grant, mediaType: mediaType, ch: make(chan []byte, 4096), done: make(chan struct{}), cancel: cancel,
		up: a.store.Create(ctx, grant.Bucket, grant.ObjectName, mediaType, key)}
	go func() {
		defer close(f.done)
		for b := range f.ch {
			if f.failed() == nil {
				if _, err := f.up.Write(b); err != nil {
					f.fail(&storeError{fmt.Errorf("upload: %w", err)})
				}
			}
			f.queued.Add(-int64(len(b)))
			a.budget.release(int64(len(b)))
			releaseChunk(b)
		}
	}()
	return f
}

func (f *filler) failed() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

func (f *filler) fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err == nil {
		f.err = err
	}
}

// offer queues a copy of p for the upload, or fails the fill if the store is too far behind.
func (f *filler) offer(p []byte) {
	if f.failed() != nil {
		return
	}
	n := int64(len(p))
	if f.queued.Load()+n > f.a.cfg.FillQueueBytes {
		f.fail(errFillBehind)
		return
	}
	if !f.a.budget.reserve(n) {
		f.fail(errOverBudget)
		return
	}
	f.queued.Add(n)
	select {
	case f.ch <- cloneChunk(p):
	default:
		f.queued.Add(-n)
		f.a.budget.release(n)
		f.fail(errFillBehind)
	}
}

// finish commits and reports the fill, or aborts it, in the background: the client's response is
// already complete.
func (f *filler) finish() {
	close(f.ch)
	a := f.a
	a.fills.Add(1)
	go func() {
		defer a.fills.Done()
		defer f.cancel()
		<-f.done
		if err := f.failed(); err != nil {
			f.up.Abort()
			var se *storeError
			if errors.As(err, &se) {
				a.endFill(f.grant.Target, err)
				a.metrics.fills.WithLabelValues("upload_failed").Inc()
			} else {
				a.endFill(f.grant.Target, nil)
				a.metrics.fills.WithLabelValues("aborted").Inc()
			}
			a.log.Debug("fill aborted", "key", f.key, "target", f.grant.Target, "err", err)
			a.abortFill(f.key, f.grant.Token, err.Error())
			return
		}
		res, err := f.up.Commit()
		if errors.Is(err, blob.ErrExists) {
			// An earlier fill stored the object but did not report it (it died, or its report
			// failed). Equal keys mean equal bytes; check that, then report what is there.
			res, err = f.adoptExisting(res)
		} else if err != nil {
			err = &storeError{err}
		}
		a.endFill(f.grant.Target, err)
		if err != nil {
			a.metrics.fills.WithLabelValues("upload_failed").Inc()
			a.log.Debug("fill upload failed", "key", f.key, "target", f.grant.Target, "err", err)
			a.abortFill(f.key, f.grant.Token, "upload failed: "+err.Error())
			return
		}
		ctx, cancel := context.WithTimeout(a.fillCtx, 10*time.Second)
		defer cancel()
		_, err = a.placement.ReportFill(ctx, &pb.ReportFillRequest{Key: f.key, Target: f.grant.Target, Token: f.grant.Token,
			Size: res.Size, MediaType: f.mediaType, Sha256: res.SHA256, Sha1: res.SHA1, ObjectName: f.grant.ObjectName,
			Crc32C: res.CRC32C, Generation: res.Generation})
		if err != nil {
			a.metrics.fills.WithLabelValues("report_failed").Inc()
			a.log.Warn("fill uploaded but its report failed; the control plane collects the bytes", "key", f.key,
				"target", f.grant.Target, "err", err)
			return
		}
		a.metrics.fills.WithLabelValues("ready").Inc()
		a.log.Debug("fill reported", "key", f.key, "target", f.grant.Target, "size", res.Size)
	}()
}

// endFill gives back a fill's slot and tells the target's breaker how the store did (err: the
// store's failure, else nil; a failure that is not the store's only ends a trial).
func (a *Agent) endFill(target string, err error) {
	a.budget.done()
	var se *storeError
	switch {
	case err == nil:
		a.breakers.result(target, nil)
	case errors.As(err, &se):
		a.breakers.result(target, err)
	default:
		a.breakers.trialEnded(target)
	}
}

// abortFill releases a claim in the background: the client's answer never waits on Detour's
// bookkeeping. Shutdown waits for it.
func (a *Agent) abortFill(key, token, reason string) {
	a.fills.Add(1)
	go func() {
		defer a.fills.Done()
		// Not fillCtx: at shutdown that is cancelled, and this is how the claim is released promptly.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if _, err := a.placement.AbortFill(ctx, &pb.AbortFillRequest{Key: key, Token: token, Reason: reason}); err != nil {
			// The claim's lease expires by itself.
			a.log.Debug("abort fill not recorded", "key", key, "err", err)
		}
	}()
}

// adoptExisting verifies that the object already in the store holds exactly the bytes this fill
// carried, and returns what is there (with its generation) to report.
func (f *filler) adoptExisting(ours blob.Result) (blob.Result, error) {
	ctx, cancel := context.WithTimeout(f.a.fillCtx, time.Minute)
	defer cancel()
	there, err := f.a.store.Hash(ctx, f.grant.Bucket, f.grant.ObjectName)
	if err != nil {
		return blob.Result{}, fmt.Errorf("object exists and cannot be read back: %w", err)
	}
	if there.Size != ours.Size || !bytes.Equal(there.SHA256, ours.SHA256) || there.CRC32C != ours.CRC32C {
		return blob.Result{}, fmt.Errorf("object exists with different content (%d bytes, want %d)", there.Size, ours.Size)
	}
	return there, nil
}
