package controlplane

import (
	"context"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/targets"
)

// sweep retires the records that must not be redirected to any more — expired ones, those of
// deleted targets, and those whose target's store moved — queueing their bytes for deletion, and
// then deletes queued bytes.
func (j *term) sweep(ctx context.Context) {
	snap := j.w.Snapshot()
	now := j.cfg.Now()
	byReason := map[string][]targets.Retirement{}
	snap.EachObject(func(key targets.Key, o *targets.Object) bool {
		reason := ""
		t, ok := snap.Target(o.Target())
		switch {
		case o.Expires != 0 && o.Expires <= now.UnixNano():
			reason = "expired"
		case !ok || t.Uid != o.Home().TargetUID:
			reason = "target_deleted"
		case t.GetStore().GetBucket() != o.Home().Bucket:
			reason = "store_moved"
		default:
			return true
		}
		byReason[reason] = append(byReason[reason], targets.Retirement{Key: key.String(), Target: o.Target(),
			ModRevision: o.ModRevision, Garbage: targets.GarbageOf(o.Proto(key), reason, now)})
		return true
	})
	for reason, rs := range byReason {
		wctx, cancel := context.WithTimeout(ctx, j.cfg.WriteTimeout*4)
		n, err := j.reg.Retire(wctx, rs)
		cancel()
		j.metrics.retired.WithLabelValues(reason).Add(float64(n))
		if err != nil {
			j.once.Warn("sweep", "sweep stopped: etcd write failed", "err", err)
			return
		}
		j.cfg.Log.Info("objects retired", "reason", reason, "count", n)
	}
	j.collectGarbage(ctx)
}

// collectGarbage deletes queued bytes from the stores; what fails stays queued for the next sweep.
func (j *term) collectGarbage(ctx context.Context) {
	if j.cfg.Store == nil {
		return
	}
	// A start that served the embedded etcd's database file before etcd was up, where that file
	// lacked events etcd had committed, may have redirected to a record one of them retired, with
	// the record's queue entry already past its grace: the queue waits a grace from when that
	// snapshot was replaced, so that agents have received the invalidations first.
	if b := j.w.MemberCopyBehind(); !b.IsZero() && time.Since(b) < j.cfg.Janitor.GarbageGrace {
		return
	}
	rctx, cancel := context.WithTimeout(ctx, j.cfg.WriteTimeout)
	entries, err := j.reg.ListGarbage(rctx, int64(j.cfg.Janitor.GarbageBatch))
	cancel()
	if err != nil {
		j.once.Warn("garbage", "cannot read the deletion queue", "err", err)
		return
	}
	var done []string
	young := j.cfg.Now().Add(-j.cfg.Janitor.GarbageGrace)
	for _, g := range entries {
		if q := g.Object.GetQueued(); q != nil && q.AsTime().After(young) {
			continue // agents may still be answering with its location from their caches
		}
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := j.cfg.Store.Delete(dctx, g.Object.Bucket, g.Object.ObjectName, g.Object.Generation)
		cancel()
		if err != nil {
			j.metrics.garbage.WithLabelValues("failed").Inc()
			j.once.Warn("garbage:"+g.Object.Bucket, "cannot delete retired objects from a bucket; will retry",
				"bucket", g.Object.Bucket, "err", err)
			continue
		}
		j.once.Forget("garbage:" + g.Object.Bucket)
		j.metrics.garbage.WithLabelValues("deleted").Inc()
		done = append(done, g.ID)
	}
	if len(done) == 0 {
		return
	}
	wctx, cancel := context.WithTimeout(ctx, j.cfg.WriteTimeout)
	defer cancel()
	if err := j.reg.GarbageDone(wctx, done); err != nil {
		// The deletions are idempotent: the next sweep deletes them again.
		j.once.Warn("garbage", "cannot dequeue deleted objects", "err", err)
	}
}

func (j *term) reconcileAll(ctx context.Context) {
	if j.cfg.Store == nil {
		return
	}
	// Collected every few seconds as it runs (collectingWhile), not under boundedWork: a memory
	// bound near the live heap kept the collector running through the round while Place calls
	// made garbage too, and at 10 000 Place/s Place's p99 was 21–22 ms during rounds with the
	// bound and 6.6 ms without it, against 2.8 ms between rounds (bench/RESULTS.md, "Place while
	// a listing runs").
	began := time.Now()
	snap := j.w.Snapshot()
	ts := snap.Targets()
	// How many records each target has, in one walk of the index for the round (a size hint for
	// each target's listing, not a figure anything is judged by).
	records := map[string]int{}
	snap.EachObject(func(_ targets.Key, o *targets.Object) bool {
		records[o.Target()]++
		return true
	})
	collectingWhile(func() {
		for _, t := range ts {
			if ctx.Err() != nil {
				return
			}
			if err := j.reconcile(ctx, t, records[t.Name]); err != nil {
				j.once.Warn("reconcile:"+t.Name, "cannot reconcile target with its bucket", "target", t.Name, "err", err)
				continue
			}
			j.once.Forget("reconcile:" + t.Name)
		}
	})
	if ctx.Err() != nil {
		return
	}
	// A round lists every object of every bucket: at a million objects, the garbage of a million
	// names and the round's lists, which the collector frees but the runtime would keep for minutes.
	releaseMemory(j.cfg.Log, "reconcile round")
	j.cfg.Log.Info("reconcile round done", "targets", len(ts), "took", time.Since(began).Round(time.Millisecond).String())
}

// reconcile lists the target's bucket prefix. Records whose object is gone (or was replaced by
// another generation) are retired; stored objects that no record or live claim accounts for and
// that are older than twice the claim TTL (failed or abandoned fills) are deleted. A listing that
// misses more records than a round may retire (allowRetirement) changes nothing; more orphans
// than a round may delete (allowOrphanDeletion) are all left.
func (j *term) reconcile(ctx context.Context, t *pb.Target, expect int) error {
	snap := j.w.Snapshot()
	prefix, bucket := t.GetStore().GetPrefix(), t.GetStore().GetBucket()
	started := j.cfg.Now()
	orphanAge := j.cfg.Janitor.OrphanAge
	if orphanAge <= 0 {
		orphanAge = 2 * policyDuration(snap.Policy().GetFillClaimTtl(), targets.DefaultFillClaimTTL)
	}
	listed := newListedObjects(expect)
	var orphans []string
	err := j.cfg.Store.List(ctx, bucket, prefix, func(l blob.Listed) bool {
		k, ok := targets.ParseKey(l.Name[len(prefix):])
		if !ok {
			return true // the canary, or not Detour's
		}
		j.metrics.reconcile.WithLabelValues(t.Name, "checked").Inc()
		listed.add(k, l.Generation)
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
	servable := 0
	snap.EachObject(func(k targets.Key, o *targets.Object) bool {
		if o.Target() != t.Name || !o.Servable(t) || o.Created >= started.UnixNano() {
			return true // another target's, stale (the sweep's), or stored after the listing began
		}
		servable++
		if gen, ok := listed.generation(k); ok && gen == o.Generation {
			return true
		}
		gone = append(gone, targets.Retirement{Key: k.String(), Target: t.Name, ModRevision: o.ModRevision})
		return true
	})
	if !j.allowRetirement(t, retirePathReconcile, len(gone), servable) {
		// A listing that misses this much is not trusted for anything this round, orphans
		// included (retireguard.go).
		return nil
	}
	if len(gone) > 0 {
		wctx, cancel := context.WithTimeout(ctx, j.cfg.WriteTimeout*4)
		n, err := j.reg.Retire(wctx, gone)
		cancel()
		j.metrics.missing.WithLabelValues(t.Name).Add(float64(n))
		j.metrics.retired.WithLabelValues("missing").Add(float64(n))
		if n > 0 {
			j.cfg.Log.Warn("objects missing from the store; records removed", "target", t.Name, "count", n)
		}
		if err != nil {
			return err
		}
	}
	if !j.allowOrphanDeletion(t, len(orphans), len(listed.objs)) {
		return nil
	}
	deleted, unread := 0, 0
	for _, name := range orphans {
		k := mustKey(name[len(prefix):])
		// No copy in this replica's index is not no record in etcd: one this release cannot read
		// (a newer release's format, during an upgrade) or one written since the snapshot. Only
		// bytes that no record names at all are an abandoned fill's.
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		recorded, err := j.reg.HoldsRecord(dctx, k.String(), t.Name)
		if err == nil && recorded {
			cancel()
			unread++
			j.metrics.reconcile.WithLabelValues(t.Name, "orphan_kept_recorded").Inc()
			continue
		}
		if err == nil {
			gen, _ := listed.generation(k) // listed: it is the listing's orphan
			err = j.cfg.Store.Delete(dctx, bucket, name, gen)
		}
		cancel()
		if err != nil {
			return err
		}
		deleted++
		j.metrics.reconcile.WithLabelValues(t.Name, "orphan_deleted").Inc()
	}
	if deleted > 0 {
		j.cfg.Log.Info("orphaned objects deleted", "target", t.Name, "count", deleted)
	}
	if unread > 0 {
		j.cfg.Log.Warn("stored objects that etcd holds a record of, but the index does not, were kept (a record this release cannot read, or one written since the snapshot)",
			"target", t.Name, "count", unread)
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
