package targets

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// checkpoints is a watcher's side of checkpoint files (checkpoint.go).
type checkpoints struct {
	path string
	pre  *Preloaded // read ahead, for the first resume
	// clusterID is the etcd cluster's, from the latest count: a checkpoint names it.
	clusterID atomic.Uint64
	mu        sync.Mutex // one write at a time
	written   int64      // revision of the last checkpoint written (under mu)
	stats     struct {
		revision, bytes    atomic.Int64  // of the last checkpoint written
		failures, setAside atomic.Uint64 // writes that failed; checkpoints a start could not use
	}
}

// CheckpointStats is what a watcher's checkpoints have done since it was made.
type CheckpointStats struct {
	Revision int64  // etcd revision of the last checkpoint this process wrote (0: none yet)
	Bytes    int64  // its size
	Failures uint64 // writes that failed
	SetAside uint64 // checkpoints a load found unusable (damaged, of another etcd, compacted past …) and read every record instead
}

// CheckpointStats reports what the checkpoints have done, for metrics.
func (w *Watcher) CheckpointStats() CheckpointStats {
	st := &w.cp.stats
	return CheckpointStats{Revision: st.revision.Load(), Bytes: st.bytes.Load(), Failures: st.failures.Load(), SetAside: st.setAside.Load()}
}

// Checkpoint makes the watcher resume its first load from the checkpoint at path when it can, and
// WriteCheckpoint write there. Call before Run.
func (w *Watcher) Checkpoint(path string) { w.cp.path = path }

// Preloaded is a checkpoint file being read ahead of the watcher that resumes from it.
type Preloaded struct {
	path string
	done chan struct{}
	cp   *checkpoint
	err  error
	// clean is the clean-stop marker the start took (UseCleanStop), nil if none.
	clean *CleanStop
}

// Preload starts reading the checkpoint at path in the background: a process can decode it while
// its embedded etcd starts, before there is a watcher (WithPreloaded hands it over).
func Preload(path string) *Preloaded {
	p := &Preloaded{path: path, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		p.cp, p.err = readCheckpoint(path)
	}()
	return p
}

// UseCleanStop gives the watcher the clean-stop marker the start took (TakeCleanStop), for
// ServeCleanStop: it is served if it matches the checkpoint. Call before WithPreloaded.
func (p *Preloaded) UseCleanStop(cs *CleanStop) { p.clean = cs }

// WithPreloaded makes the watcher resume from p's checkpoint (and write its own there), using what
// p has read for its first attempt. Call before Run.
func (w *Watcher) WithPreloaded(p *Preloaded) {
	w.cp.path, w.cp.pre = p.path, p
}

// read reads the checkpoint: the preloaded one the first time, the file after that.
func (c *checkpoints) read(ctx context.Context) (*checkpoint, error) {
	if p := c.pre; p != nil {
		c.pre = nil
		select {
		case <-p.done:
			return p.cp, p.err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return readCheckpoint(c.path)
}

// errUnusable marks why a checkpoint cannot be resumed from (as opposed to etcd being unreachable,
// which is retried).
type errUnusable struct{ err error }

func (e errUnusable) Error() string { return e.err.Error() }
func (e errUnusable) Unwrap() error { return e.err }

func unusable(format string, args ...any) error { return errUnusable{fmt.Errorf(format, args...)} }

// resume loads the snapshot from the checkpoint, the rest of the state at its revision and etcd's
// history since, and publishes it once it has caught up with the revision etcd was at when the
// resume began. It returns the revision the snapshot holds every event up to.
func (w *Watcher) resume(ctx context.Context) (int64, error) {
	began := time.Now()
	w.progress.records.Store(0)
	w.progress.expected.Store(0)
	w.progress.began.Store(began.UnixNano())
	cp, err := w.cp.read(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return 0, err
		}
		return 0, errUnusable{err}
	}
	if cp.prefix != w.prefix {
		return 0, unusable("the checkpoint is of prefix %q, this watcher's is %q", cp.prefix, w.prefix)
	}
	objPrefix := w.prefix + "objects/"
	now, cluster, err := w.head(ctx, 30*time.Second)
	if err != nil {
		return 0, err
	}
	w.cp.clusterID.Store(cluster)
	// From here etcd has answered: a failure is the checkpoint's path failing, and a full read
	// (which has its own retries) is tried rather than this path again and again.
	if cluster != cp.clusterID {
		return 0, unusable("the checkpoint is of etcd cluster %x, this etcd is cluster %x", cp.clusterID, cluster)
	}
	if cp.revision > now {
		return 0, unusable("the checkpoint is at revision %d, ahead of etcd's %d: etcd was restored or replaced", cp.revision, now)
	}
	w.progress.expected.Store(int64(cp.objects.count))
	w.progress.records.Store(int64(cp.objects.count))
	snap := emptySnapshot()
	snap.objects = cp.objects
	// Everything but object records, at the checkpoint's revision: before objects/ and after it.
	// (In pages: the garbage queue and copy jobs are among them.)
	for _, r := range [][2]string{{w.prefix, objPrefix}, {clientv3.GetPrefixRangeEnd(objPrefix), clientv3.GetPrefixRangeEnd(w.prefix)}} {
		err := w.readRange(ctx, r[0], r[1], cp.revision, func(kvs []*mvccpb.KeyValue) {
			for _, kv := range kvs {
				w.apply(snap, nil, mvccpb.PUT, kv)
			}
		})
		if errors.Is(err, rpctypes.ErrCompacted) {
			return 0, unusable("etcd has compacted the checkpoint's revision %d", cp.revision)
		}
		if err != nil {
			return 0, errUnusable{err}
		}
	}
	snap.Revision, snap.TargetsRevision, snap.applied = cp.revision, cp.revision, cp.revision
	w.finish(snap)
	snap, events, err := w.followFrom(ctx, snap, now, "the checkpoint")
	if err != nil {
		return 0, err
	}
	w.cp.mu.Lock()
	w.cp.written = max(w.cp.written, cp.revision)
	w.cp.mu.Unlock()
	w.invalidations.reset(snap.applied)
	w.publish(snap)
	w.log.Info("snapshot resumed from the checkpoint", "path", w.cp.path, "checkpoint_revision", cp.revision,
		"revision", snap.applied, "events_replayed", events, "targets", len(snap.targets), "objects", snap.objects.count,
		"claims", len(snap.claims), "took", time.Since(began).Round(time.Millisecond).String())
	return snap.applied, nil
}

// followFrom is catchUp from snap, read from what (a checkpoint, a database file), with its
// failures to follow on made unusable (a full read is tried instead), and the context's left as
// they are.
func (w *Watcher) followFrom(ctx context.Context, snap *Snapshot, target int64, what string) (*Snapshot, int, error) {
	from := snap.applied
	next, events, err := w.catchUp(ctx, snap, target)
	switch {
	case errors.Is(err, rpctypes.ErrCompacted):
		return nil, 0, unusable("etcd has compacted the history after %s's revision %d", what, from)
	case err != nil && ctx.Err() != nil:
		return nil, 0, err
	case err != nil:
		return nil, 0, unusable("follow etcd from %s's revision %d: %w", what, from, err)
	}
	return next, events, nil
}

// catchUpLimit bounds a catch-up: past it the checkpoint is given up for a full read.
const catchUpLimit = 2 * time.Minute

// catchUp applies etcd's history after snap.applied to snap, until every event up to revision
// target (or later) is in it: an event at or past target (events come in revision order, a
// revision's all in one response), or a progress notification at or past it, which etcd sends
// only to a watch that has caught up (etcd's gRPC proxy answers no progress requests: then only
// the events, or catchUpLimit, end it). It returns the snapshot and how many events it applied.
func (w *Watcher) catchUp(ctx context.Context, snap *Snapshot, target int64) (*Snapshot, int, error) {
	if snap.applied >= target {
		return snap, 0, nil
	}
	wctx, cancel := context.WithTimeoutCause(clientv3.WithRequireLeader(ctx), catchUpLimit,
		fmt.Errorf("etcd's history up to revision %d not received within %s", target, catchUpLimit))
	defer cancel()
	ch := w.cli.Watch(wctx, w.prefix, clientv3.WithPrefix(), clientv3.WithRev(snap.applied+1), clientv3.WithProgressNotify())
	// etcd ignores a progress request while the watch is behind: ask until one is answered.
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	n := 0
	for {
		select {
		case <-wctx.Done():
			return nil, n, context.Cause(wctx)
		case <-t.C:
			_ = w.cli.RequestProgress(wctx)
		case resp, ok := <-ch:
			if !ok {
				if wctx.Err() != nil {
					return nil, n, context.Cause(wctx)
				}
				return nil, n, errors.New("the watch ended")
			}
			if err := resp.Err(); err != nil {
				return nil, n, err
			}
			if len(resp.Events) > 0 {
				snap, _ = w.next(snap, resp.Events)
				n += len(resp.Events)
				if snap.applied >= target {
					return snap, n, nil
				}
			}
			if resp.IsProgressNotify() && resp.Header.Revision >= target {
				snap.applied = max(snap.applied, resp.Header.Revision)
				snap.Revision = max(snap.Revision, resp.Header.Revision)
				return snap, n, nil
			}
		}
	}
}

// WriteCheckpoint writes the current snapshot's object index to the checkpoint file, unless no
// load has completed or the last checkpoint holds the same revision. It returns the revision
// written (0: none).
func (w *Watcher) WriteCheckpoint() (int64, error) {
	if w.cp.path == "" {
		return 0, nil
	}
	select {
	case <-w.ready:
	default:
		return 0, nil
	}
	w.cp.mu.Lock()
	defer w.cp.mu.Unlock()
	snap := w.Snapshot()
	rev := snap.applied
	if rev <= w.cp.written {
		return 0, nil
	}
	began := time.Now()
	n, err := w.writeCheckpointLocked(snap, w.cp.clusterID.Load())
	if err != nil {
		return 0, err
	}
	w.log.Debug("checkpoint written", "path", w.cp.path, "revision", rev, "objects", snap.objects.count, "bytes", n,
		"took", time.Since(began).Round(time.Millisecond).String())
	return rev, nil
}

// writeCheckpointLocked writes snap's index, exact at its applied revision, as the checkpoint and
// counts it. w.cp.mu is held.
func (w *Watcher) writeCheckpointLocked(snap *Snapshot, clusterID uint64) (int64, error) {
	rev := snap.applied
	n, err := writeCheckpoint(w.cp.path, snap, rev, clusterID, w.prefix)
	if err != nil {
		w.cp.stats.failures.Add(1)
		return 0, fmt.Errorf("write the checkpoint %s: %w", w.cp.path, err)
	}
	w.cp.written = rev
	w.cp.stats.revision.Store(rev)
	w.cp.stats.bytes.Store(n)
	return n, nil
}

// RunCheckpoints writes a checkpoint every interval until ctx ends. A failed write is logged (once
// per run of failures) and tried again at the next interval.
func (w *Watcher) RunCheckpoints(ctx context.Context, every time.Duration) {
	if w.cp.path == "" || every <= 0 {
		return
	}
	t := time.NewTicker(every)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		_, err := w.WriteCheckpoint()
		switch {
		case err != nil && !failing:
			w.log.Warn("cannot write the checkpoint; the next start reads every record from etcd", "err", err)
		case err == nil && failing:
			w.log.Info("checkpoint written again", "path", w.cp.path)
		}
		failing = err != nil
	}
}

// logUnusable says why the first load reads every record rather than the checkpoint.
func (w *Watcher) logUnusable(err error) {
	if errors.Is(err, fs.ErrNotExist) {
		w.log.Info("no checkpoint yet; reading every record from etcd", "path", w.cp.path)
		return
	}
	w.cp.stats.setAside.Add(1)
	w.log.Log(context.Background(), slog.LevelWarn, "checkpoint not used; reading every record from etcd",
		"path", w.cp.path, "age", checkpointAge(w.cp.path).String(), "reason", err)
}
