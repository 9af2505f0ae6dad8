package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
)

var (
	errFillBehind = errors.New("store fell too far behind the client")
	errOverBudget = errors.New("all fills together hold as many bytes as the agent allows")
	errEmpty      = errors.New("response has no bytes to store")
	errTwoModes   = errors.New("fill written both as a tee and directly")
)

// storeError marks a fill's failure as the store's (an upload that failed), which the target's
// breaker counts; other failures (client, origin, budget) say nothing about the store.
type storeError struct{ err error }

func (e *storeError) Error() string { return e.err.Error() }
func (e *storeError) Unwrap() error { return e.err }

// FillWriter stores one response at the target a fill grant names. A front feeds it either as a
// tee beside a client's answer (Offer: the client never waits on the store) or, for a fill no
// client is waiting for, as an io.Writer (Write: the writer waits on the store). Whatever
// happens, the front ends it with Finish, exactly once: the upload is committed and reported, or
// aborted with its claim released, in the background.
type FillWriter struct {
	a         *Agent
	key       string
	command   string
	mediaType string
	grant     *pb.FillGrant
	ctx       context.Context
	cancel    context.CancelFunc

	up      Upload        // made at the first byte
	ch      chan []byte   // Offer's queue, drained by one goroutine
	drained chan struct{} // closed when that goroutine ends
	queued  atomic.Int64
	direct  bool // Write was used
	bytes   int64

	mu  sync.Mutex
	err error
}

// startFill admits a granted fill: the store exists, the budget has room, and the target's store
// breaker lets it through. A declined grant's claim is released at once; nil means inline.
func (a *Agent) startFill(q Query, grant *pb.FillGrant) *FillWriter {
	if a.store == nil || !a.budget.start() {
		a.declineFill(q.Key, grant, "agent cannot fill now")
		return nil
	}
	if !a.breakers.begin(grant.Target) {
		a.budget.done()
		a.declineFill(q.Key, grant, "store breaker open")
		return nil
	}
	// The claim ends at its TTL and a report after that is refused, so the upload gets no longer.
	ttl := grant.Ttl.AsDuration()
	if ttl <= 0 {
		ttl = time.Minute
	}
	ctx, cancel := context.WithTimeout(a.fillCtx, ttl)
	mediaType := grant.MediaType
	if mediaType == "" {
		mediaType = q.MediaType
	}
	return &FillWriter{a: a, key: q.Key, command: q.Command, grant: grant, mediaType: mediaType, ctx: ctx, cancel: cancel}
}

// declineFill releases a grant the agent does not run (granted although the agent said it cannot
// fill, or its budget filled up since it asked).
func (a *Agent) declineFill(key string, grant *pb.FillGrant, why string) {
	a.metrics.fills.WithLabelValues("declined").Inc()
	a.abortFill(key, grant.Token, why)
}

// Key is the content key being filled.
func (f *FillWriter) Key() string { return f.key }

// Context ends when the fill's claim does, or when the agent shuts down.
func (f *FillWriter) Context() context.Context { return f.ctx }

func (f *FillWriter) upload() Upload {
	if f.up == nil {
		f.up = f.a.store.Create(f.ctx, f.grant.Bucket, f.grant.ObjectName, f.mediaType, f.key)
	}
	return f.up
}

// Failed returns the error that failed the fill, or nil.
func (f *FillWriter) Failed() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

// Fail marks the fill failed (the first error counts): Finish then aborts it.
func (f *FillWriter) Fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err == nil {
		f.err = err
	}
}

// Offer queues a copy of p for the upload without waiting, or fails the fill if the store has
// fallen FillQueueBytes behind or all fills together hold FillBytesTotal.
func (f *FillWriter) Offer(p []byte) {
	if f.Failed() != nil || len(p) == 0 {
		return
	}
	if f.direct {
		f.Fail(errTwoModes)
		return
	}
	if f.ch == nil {
		f.ch, f.drained = make(chan []byte, 4096), make(chan struct{})
		up := f.upload()
		go func() {
			defer close(f.drained)
			for b := range f.ch {
				if f.Failed() == nil {
					if _, err := up.Write(b); err != nil {
						f.Fail(&storeError{fmt.Errorf("upload: %w", err)})
					}
				}
				f.queued.Add(-int64(len(b)))
				f.a.budget.release(int64(len(b)))
				releaseChunk(b)
			}
		}()
	}
	n := int64(len(p))
	if f.queued.Load()+n > f.a.cfg.FillQueueBytes {
		f.Fail(errFillBehind)
		return
	}
	if !f.a.budget.reserve(n) {
		f.Fail(errOverBudget)
		return
	}
	f.queued.Add(n)
	select {
	case f.ch <- cloneChunk(p):
		f.bytes += n
	default:
		f.queued.Add(-n)
		f.a.budget.release(n)
		f.Fail(errFillBehind)
	}
}

// Write sends p to the upload and waits for the store to take it. It is for fills no client is
// waiting for; a fill is written either with Offer or with Write.
func (f *FillWriter) Write(p []byte) (int, error) {
	if err := f.Failed(); err != nil {
		return 0, err
	}
	if f.ch != nil {
		f.Fail(errTwoModes)
		return 0, errTwoModes
	}
	f.direct = true
	n, err := f.upload().Write(p)
	f.bytes += int64(n)
	if err != nil {
		err = &storeError{fmt.Errorf("upload: %w", err)}
		f.Fail(err)
	}
	return n, err
}

// Finish ends the fill: it commits and reports the upload, or aborts it and releases the claim,
// in the background (the client's answer is already complete). Shutdown waits for it.
func (f *FillWriter) Finish() {
	if f.ch != nil {
		close(f.ch)
	}
	if f.bytes == 0 {
		f.Fail(errEmpty)
	}
	a := f.a
	a.metrics.inlineBytes.Add(float64(f.bytes))
	a.work.Add(1)
	go func() {
		defer a.work.Done()
		defer f.cancel()
		if f.drained != nil {
			<-f.drained
		}
		a.endFill(f)
	}()
}

// endFill commits or aborts a finished fill and tells the control plane.
func (a *Agent) endFill(f *FillWriter) {
	if err := f.Failed(); err != nil {
		if f.up != nil {
			f.up.Abort()
		}
		var se *storeError
		if errors.As(err, &se) {
			a.fillDone(f.grant.Target, err)
			a.metrics.fills.WithLabelValues("upload_failed").Inc()
		} else {
			a.fillDone(f.grant.Target, nil)
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
	a.fillDone(f.grant.Target, err)
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
	a.CountBytes(f.command, BytesFilled, int64(res.Size))
	a.log.Debug("fill reported", "key", f.key, "target", f.grant.Target, "size", res.Size)
}

// fillDone gives back a fill's slot and tells the target's breaker how the store did (err: the
// store's failure, else nil; a failure that is not the store's only ends a trial).
func (a *Agent) fillDone(target string, err error) {
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
	a.work.Add(1)
	go func() {
		defer a.work.Done()
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
func (f *FillWriter) adoptExisting(ours blob.Result) (blob.Result, error) {
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
