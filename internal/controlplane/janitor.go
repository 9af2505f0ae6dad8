package controlplane

import (
	"context"
	"errors"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/targets"
)

// JanitorConfig sets the intervals of the work one replica at a time does for the fleet.
type JanitorConfig struct {
	// ProbeInterval is how often each target's client-facing URL is fetched (default 2s);
	// ProbeTimeout bounds one fetch (default ProbeInterval). ProbeFailures consecutive failures
	// make a target unhealthy (default 3), ProbeRecoveries consecutive successes healthy again
	// (default 2): detection within ProbeFailures·ProbeInterval + ProbeTimeout.
	ProbeInterval   time.Duration
	ProbeTimeout    time.Duration
	ProbeFailures   int
	ProbeRecoveries int
	// SweepInterval is how often expired and stale records are retired and queued bytes deleted
	// (default 30s).
	SweepInterval time.Duration
	// ReconcileInterval is how often each target's bucket prefix is listed against the index
	// (default 10m).
	ReconcileInterval time.Duration
	// GarbageBatch is how many queued deletions one sweep takes (default 500).
	GarbageBatch int
	// GarbageGrace is how long the bytes of a retired record stay before they are deleted, so that
	// every agent has received the record's invalidation (and stopped handing out its location)
	// first (default 15s).
	GarbageGrace time.Duration
	// OrphanAge is how old a stored object that no record or claim accounts for must be before the
	// reconciler deletes it (default: twice the policy's fill claim TTL).
	OrphanAge time.Duration
	// ExtendInterval is how often each replica writes the expiry extensions of the objects it
	// redirected to (default 5s).
	ExtendInterval time.Duration
	// CopyInterval is how often each replica queues the cross-region copies its redirect counts
	// call for, and how often the elected janitor works through that queue and through the sole
	// copies of draining targets (default 2s).
	CopyInterval time.Duration
	// CopyRate bounds the server-side copies the janitor starts per second, cross-region copies
	// and drain migration together (default 5).
	CopyRate float64
	// HotKeys bounds the (key, region) pairs each replica counts cross-region redirects for
	// (default 100000, about 12 MB).
	HotKeys int
}

func (c *JanitorConfig) defaults() {
	if c.ProbeInterval <= 0 {
		c.ProbeInterval = 2 * time.Second
	}
	if c.ProbeTimeout <= 0 {
		c.ProbeTimeout = c.ProbeInterval
	}
	if c.ProbeFailures <= 0 {
		c.ProbeFailures = 3
	}
	if c.ProbeRecoveries <= 0 {
		c.ProbeRecoveries = 2
	}
	if c.SweepInterval <= 0 {
		c.SweepInterval = 30 * time.Second
	}
	if c.ReconcileInterval <= 0 {
		c.ReconcileInterval = 10 * time.Minute
	}
	if c.GarbageBatch <= 0 {
		c.GarbageBatch = 500
	}
	if c.GarbageGrace <= 0 {
		c.GarbageGrace = 15 * time.Second
	}
	if c.ExtendInterval <= 0 {
		c.ExtendInterval = 5 * time.Second
	}
	if c.CopyInterval <= 0 {
		c.CopyInterval = 2 * time.Second
	}
	if c.CopyRate <= 0 {
		c.CopyRate = 5
	}
	if c.HotKeys <= 0 {
		c.HotKeys = 100000
	}
}

// RunJanitor campaigns for the janitor role (an etcd election under the registry's prefix) and,
// while elected, probes targets, sweeps expired and stale records, deletes the stored bytes of
// retired objects, reconciles each target's bucket with the index, and makes the copies the fleet
// needs (queued cross-region copies, draining targets' sole copies; see copies.go). It returns when ctx ends.
// Every write the janitor makes compares revisions, so a deposed janitor that has not noticed yet
// cannot undo newer state.
func (s *Service) RunJanitor(ctx context.Context, cli *clientv3.Client, id string) {
	for ctx.Err() == nil {
		err := s.janitorTerm(ctx, cli, id)
		if ctx.Err() != nil {
			return
		}
		s.once.Warn("janitor", "janitor election failed; retrying", "err", err)
		select {
		case <-time.After(time.Second):
		case <-ctx.Done():
		}
	}
}

func (s *Service) janitorTerm(ctx context.Context, cli *clientv3.Client, id string) error {
	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(10), concurrency.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("election session: %w", err)
	}
	defer sess.Close()
	e := concurrency.NewElection(sess, s.reg.Prefix()+"election/janitor")
	if err := e.Campaign(ctx, id); err != nil {
		return fmt.Errorf("campaign: %w", err)
	}
	s.once.Forget("janitor")
	s.cfg.Log.Info("elected janitor: probing targets, sweeping, reconciling and copying", "id", id)
	s.metrics.janitor.Set(1)
	defer s.metrics.janitor.Set(0)
	termCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-sess.Done():
			s.cfg.Log.Warn("janitor session lost; standing down", "id", id)
			cancel()
		case <-termCtx.Done():
		}
	}()
	loops := []func(context.Context){
		s.runProber,
		func(ctx context.Context) { s.every(ctx, s.cfg.Janitor.SweepInterval, s.sweep) },
		func(ctx context.Context) { s.every(ctx, s.cfg.Janitor.ReconcileInterval, s.reconcileAll) },
		func(ctx context.Context) { s.runCopier(ctx, id) },
	}
	done := make(chan struct{}, len(loops))
	for _, loop := range loops {
		go func() { loop(termCtx); done <- struct{}{} }()
	}
	for range loops {
		<-done
	}
	rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer rcancel()
	_ = e.Resign(rctx)
	if ctx.Err() != nil {
		return nil
	}
	return errors.New("janitor term ended")
}

// every runs fn at once and then every interval until ctx ends.
func (s *Service) every(ctx context.Context, interval time.Duration, fn func(context.Context)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		fn(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Sweep runs one sweep now (tests; the elected janitor sweeps on its own).
func (s *Service) Sweep(ctx context.Context) { s.sweep(ctx) }

// sweep retires the records that must not be redirected to any more — expired ones, those of
// deleted targets, and those whose target's store moved — queueing their bytes for deletion, and
// then deletes queued bytes.
func (s *Service) sweep(ctx context.Context) {
	snap := s.w.Snapshot()
	now := s.cfg.Now()
	byReason := map[string][]targets.Retirement{}
	snap.EachObject(func(key targets.Key, o *targets.Object) bool {
		reason := ""
		t, ok := snap.Target(o.Target())
		switch {
		case o.Expires != 0 && o.Expires <= now.UnixNano():
			reason = "expired"
		case !ok || t.Uid != o.Home.TargetUID:
			reason = "target_deleted"
		case t.GetStore().GetBucket() != o.Home.Bucket:
			reason = "store_moved"
		default:
			return true
		}
		byReason[reason] = append(byReason[reason], targets.Retirement{Key: key.String(), Target: o.Target(),
			ModRevision: o.ModRevision, Garbage: targets.GarbageOf(o.Proto(key), reason, now)})
		return true
	})
	for reason, rs := range byReason {
		wctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout*4)
		n, err := s.reg.Retire(wctx, rs)
		cancel()
		s.metrics.retired.WithLabelValues(reason).Add(float64(n))
		if err != nil {
			s.once.Warn("sweep", "sweep stopped: etcd write failed", "err", err)
			return
		}
		s.cfg.Log.Info("objects retired", "reason", reason, "count", n)
	}
	s.collectGarbage(ctx)
}

// collectGarbage deletes queued bytes from the stores; what fails stays queued for the next sweep.
func (s *Service) collectGarbage(ctx context.Context) {
	if s.cfg.Store == nil {
		return
	}
	rctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout)
	entries, err := s.reg.ListGarbage(rctx, int64(s.cfg.Janitor.GarbageBatch))
	cancel()
	if err != nil {
		s.once.Warn("garbage", "cannot read the deletion queue", "err", err)
		return
	}
	var done []string
	young := s.cfg.Now().Add(-s.cfg.Janitor.GarbageGrace)
	for _, g := range entries {
		if q := g.Object.GetQueued(); q != nil && q.AsTime().After(young) {
			continue // agents may still be answering with its location from their caches
		}
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := s.cfg.Store.Delete(dctx, g.Object.Bucket, g.Object.ObjectName, g.Object.Generation)
		cancel()
		if err != nil {
			s.metrics.garbage.WithLabelValues("failed").Inc()
			s.once.Warn("garbage:"+g.Object.Bucket, "cannot delete retired objects from a bucket; will retry",
				"bucket", g.Object.Bucket, "err", err)
			continue
		}
		s.once.Forget("garbage:" + g.Object.Bucket)
		s.metrics.garbage.WithLabelValues("deleted").Inc()
		done = append(done, g.ID)
	}
	if len(done) == 0 {
		return
	}
	wctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout)
	defer cancel()
	if err := s.reg.GarbageDone(wctx, done); err != nil {
		// The deletions are idempotent: the next sweep deletes them again.
		s.once.Warn("garbage", "cannot dequeue deleted objects", "err", err)
	}
}

// Reconcile lists every target's bucket against the index now (tests; the janitor does it on its
// own every ReconcileInterval).
func (s *Service) Reconcile(ctx context.Context) { s.reconcileAll(ctx) }

func (s *Service) reconcileAll(ctx context.Context) {
	if s.cfg.Store == nil {
		return
	}
	for _, t := range s.w.Snapshot().Targets() {
		if ctx.Err() != nil {
			return
		}
		if err := s.reconcile(ctx, t); err != nil {
			s.once.Warn("reconcile:"+t.Name, "cannot reconcile target with its bucket", "target", t.Name, "err", err)
			continue
		}
		s.once.Forget("reconcile:" + t.Name)
	}
}

// reconcile lists the target's bucket prefix. Records whose object is gone (or was replaced by
// another generation) are retired; stored objects that no record or live claim accounts for and
// that are older than twice the claim TTL (failed or abandoned fills) are deleted.
func (s *Service) reconcile(ctx context.Context, t *pb.Target) error {
	snap := s.w.Snapshot()
	prefix, bucket := t.GetStore().GetPrefix(), t.GetStore().GetBucket()
	started := s.cfg.Now()
	orphanAge := s.cfg.Janitor.OrphanAge
	if orphanAge <= 0 {
		orphanAge = 2 * policyDuration(snap.Policy().GetFillClaimTtl(), targets.DefaultFillClaimTTL)
	}
	listed := map[targets.Key]int64{} // key → generation
	var orphans []string
	err := s.cfg.Store.List(ctx, bucket, prefix, func(l blob.Listed) bool {
		k, ok := targets.ParseKey(l.Name[len(prefix):])
		if !ok {
			return true // the canary, or not Detour's
		}
		s.metrics.reconcile.WithLabelValues(t.Name, "checked").Inc()
		listed[k] = l.Generation
		if copyAt(snap, k, t) == nil {
			if _, claimed := snap.Claim(k.String()); !claimed && started.Sub(l.Created) > orphanAge {
				orphans = append(orphans, l.Name)
			}
		}
		return true
	})
	if err != nil {
		return err
	}
	var gone []targets.Retirement
	snap.EachObject(func(k targets.Key, o *targets.Object) bool {
		if o.Target() != t.Name || !o.Servable(t) || o.Created >= started.UnixNano() {
			return true // another target's, stale (the sweep's), or stored after the listing began
		}
		if gen, ok := listed[k]; ok && gen == o.Generation {
			return true
		}
		gone = append(gone, targets.Retirement{Key: k.String(), Target: t.Name, ModRevision: o.ModRevision})
		return true
	})
	if len(gone) > 0 {
		wctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout*4)
		n, err := s.reg.Retire(wctx, gone)
		cancel()
		s.metrics.missing.WithLabelValues(t.Name).Add(float64(n))
		s.metrics.retired.WithLabelValues("missing").Add(float64(n))
		if n > 0 {
			s.cfg.Log.Warn("objects missing from the store; records removed", "target", t.Name, "count", n)
		}
		if err != nil {
			return err
		}
	}
	for _, name := range orphans {
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := s.cfg.Store.Delete(dctx, bucket, name, listed[mustKey(name[len(prefix):])])
		cancel()
		if err != nil {
			return err
		}
		s.metrics.reconcile.WithLabelValues(t.Name, "orphan_deleted").Inc()
	}
	if len(orphans) > 0 {
		s.cfg.Log.Info("orphaned objects deleted", "target", t.Name, "count", len(orphans))
	}
	return nil
}

func mustKey(s string) targets.Key {
	k, _ := targets.ParseKey(s)
	return k
}

// copyAt returns the servable copy of key at target t, if the index has one.
func copyAt(snap *targets.Snapshot, key targets.Key, t *pb.Target) *targets.Object {
	copies := snap.Copies(key)
	for i := range copies {
		if copies[i].Target() == t.Name && copies[i].Servable(t) {
			return &copies[i]
		}
	}
	return nil
}

// IndexedObjects is the number of object records in this replica's snapshot.
func (s *Service) IndexedObjects() int { return s.w.Snapshot().ObjectCount() }
