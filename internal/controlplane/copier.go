package controlplane

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/targets"
)

// The janitor's copier: see copies.go for the kinds of copies and how they are asked for.

// Copy reasons, for metrics and logs.
const (
	copyCrossRegion = "cross_region"
	copyDrain       = "drain"
)

// copyJob is one copy to make: key's copy src, into target dst.
type copyJob struct {
	key    targets.Key
	src    targets.Object
	dst    *pb.Target
	reason string
	entry  *targets.CopyEntry // the queued request, for cross-region copies
}

// pacer spaces the starts of copies gap apart.
type pacer struct {
	gap  time.Duration
	next time.Time
}

func (p *pacer) wait(ctx context.Context) bool {
	if d := time.Until(p.next); d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return false
		}
	}
	p.next = time.Now().Add(p.gap)
	return ctx.Err() == nil
}

// runCopier makes, while this replica is the janitor, the copies the fleet needs: queued
// cross-region copies and migrations of draining targets' sole copies.
func (j *term) runCopier(ctx context.Context) {
	if j.cfg.Store == nil {
		return
	}
	p := &pacer{gap: time.Duration(float64(time.Second) / j.cfg.Janitor.CopyRate)}
	stuck := map[string]bool{} // draining targets whose drain cannot progress, logged once
	j.every(ctx, loopCopy, j.cfg.Janitor.CopyInterval, nil, func(ctx context.Context) { j.copyRound(ctx, p, stuck) })
	// Only the janitor exports drain progress; a deposed one would export stale figures.
	j.metrics.soleCopies.Reset()
}

// copyRound makes at most CopyRate·CopyInterval copies, alternating between queued cross-region
// copies and drain migrations so that neither starves the other.
func (j *term) copyRound(ctx context.Context, p *pacer, stuck map[string]bool) {
	budget := max(1, int(math.Ceil(j.cfg.Janitor.CopyRate*j.cfg.Janitor.CopyInterval.Seconds())))
	snap := j.w.Snapshot()
	v := j.viewOf(snap)
	now := j.cfg.Now()

	rctx, cancel := context.WithTimeout(ctx, j.cfg.WriteTimeout)
	queued, err := j.reg.ListCopyRequests(rctx, int64(budget)*4)
	cancel()
	if err != nil {
		j.once.Warn("copier", "cannot read the copy queue", "err", err)
	}
	var cross []copyJob
	var done []targets.CopyEntry // requests to remove: obsolete, or their copy is made
	for i := range queued {
		job, state := crossRegionJob(snap, v, &queued[i], now)
		switch state {
		case jobObsolete:
			done = append(done, queued[i])
		case jobReady:
			cross = append(cross, job)
		}
	}

	progress, sole := drainScan(snap, now, budget)
	j.metrics.soleCopies.Reset()
	for name, pr := range progress {
		j.metrics.soleCopies.WithLabelValues(name).Set(float64(pr.SoleCopies))
	}
	var drain []copyJob
	for _, m := range sole {
		home := v.fleet.Home(m.key.String(), m.from.Region)
		if home == "" {
			if !stuck[m.from.Name] {
				stuck[m.from.Name] = true
				j.cfg.Log.Warn("drain cannot progress: no active, healthy target may take the draining target's sole copies",
					"target", m.from.Name, "region", m.from.Region, "forbid_cross_region_fills", v.policy.ForbidCrossRegionFills)
			}
			continue
		}
		delete(stuck, m.from.Name)
		dst, _ := snap.Target(home)
		drain = append(drain, copyJob{key: m.key, src: m.obj, dst: dst, reason: copyDrain})
	}

	made := map[string]int{}
	for i := 0; i < budget && (len(cross) > 0 || len(drain) > 0); i++ {
		var job copyJob
		if len(cross) > 0 && (i%2 == 0 || len(drain) == 0) {
			job, cross = cross[0], cross[1:]
		} else {
			job, drain = drain[0], drain[1:]
		}
		if !p.wait(ctx) {
			break
		}
		err := j.copyObject(ctx, job)
		switch {
		case err == nil:
			made[job.reason]++
		case errors.Is(err, errCopyBusy):
			continue // the key is being filled or copied; the request stays
		default:
			j.once.Warn("copy:"+job.dst.Name, "copies into target failing", "target", job.dst.Name, "reason", job.reason, "err", err)
		}
		// A failed copy's request is dropped too: the pair is counted again in its next window.
		if job.entry != nil {
			done = append(done, *job.entry)
		}
	}
	if len(done) > 0 {
		wctx, cancel := context.WithTimeout(ctx, j.cfg.WriteTimeout)
		if err := j.reg.CopyRequestsDone(wctx, done); err != nil {
			j.once.Warn("copier", "cannot dequeue copy requests", "err", err)
		}
		cancel()
	}
	if n := made[copyCrossRegion] + made[copyDrain]; n > 0 {
		j.cfg.Log.Info("copies made", "cross_region", made[copyCrossRegion], "drain", made[copyDrain])
	}
}

type jobState int

const (
	jobReady jobState = iota
	jobObsolete
	jobWait
)

// crossRegionJob turns a queued request into a copy, or says why not: the region already has a
// copy at an active target, has no active healthy target, or no copy is left to copy from
// (obsolete); or the key is being filled or copied (wait).
func crossRegionJob(snap *targets.Snapshot, v *view, e *targets.CopyEntry, now time.Time) (copyJob, jobState) {
	key, ok := targets.ParseKey(e.Request.Key)
	if !ok {
		return copyJob{}, jobObsolete
	}
	var src *targets.Object
	srcRank := 3
	for _, o := range liveCopies(snap, key, now) {
		t, _ := snap.Target(o.Target())
		if t.Region == e.Request.Region && t.State == pb.TargetState_TARGET_STATE_ACTIVE {
			return copyJob{}, jobObsolete
		}
		// Any copy serves as the source (the store copies it); a disabled target's never does.
		r := 3
		switch {
		case t.State == pb.TargetState_TARGET_STATE_DISABLED:
			continue
		case t.Healthy && t.State == pb.TargetState_TARGET_STATE_ACTIVE:
			r = 0
		case t.Healthy:
			r = 1
		default:
			r = 2
		}
		if r < srcRank {
			src, srcRank = o, r
		}
	}
	dst := v.fleet.InRegion(e.Request.Key, e.Request.Region)
	if src == nil || dst == "" {
		return copyJob{}, jobObsolete
	}
	if _, held := snap.Claim(e.Request.Key); held {
		return copyJob{}, jobWait
	}
	t, _ := snap.Target(dst)
	return copyJob{key: key, src: *src, dst: t, reason: copyCrossRegion, entry: e}, jobReady
}

// liveCopies are key's copies that are where their target keeps objects now and not expired.
func liveCopies(snap *targets.Snapshot, key targets.Key, now time.Time) []*targets.Object {
	copies := snap.Copies(key)
	out := make([]*targets.Object, 0, len(copies))
	for i := range copies {
		o := &copies[i]
		if t, ok := snap.Target(o.Target()); ok && o.Servable(t) && (o.Expires == 0 || o.Expires > now.UnixNano()) {
			out = append(out, o)
		}
	}
	return out
}

// errCopyBusy means the key's fill claim is held: a fill or another copy is under way.
var errCopyBusy = errors.New("the key is being filled or copied")

// copyObject makes job.dst hold a verified copy of job.src: under the key's fill claim (one fill
// or copy of a key at a time, fleet-wide), a server-side copy of the source's recorded generation,
// then the same verification a reported fill gets, against the source's record (size, CRC32C,
// media type, and the key and hashes recorded with the bytes), then a READY record bound to the
// destination's bucket, uid and the copy's generation.
func (j *term) copyObject(ctx context.Context, job copyJob) error {
	start := time.Now()
	snap := j.w.Snapshot()
	k := job.key.String()
	ttl := policyDuration(snap.Policy().GetFillClaimTtl(), targets.DefaultFillClaimTTL)
	claim := &pb.FillClaim{Key: k, Target: job.dst.Name, AgentId: "copier:" + j.id, Token: targets.NewToken(),
		ObjectName: blob.ObjectName(job.dst.GetStore().GetPrefix(), k), Bucket: job.dst.GetStore().GetBucket(),
		MediaType: job.src.Home().MediaType, TargetUid: job.dst.Uid, Granted: timestamppb.New(j.cfg.Now()), Transient: job.src.Transient}
	wctx, cancel := j.writeCtx(ctx)
	granted, err := j.reg.Claim(wctx, claim, ttl)
	cancel()
	if err != nil {
		return j.copied(job, "failed", start, fmt.Errorf("claim: %w", err))
	}
	if !granted {
		return j.copied(job, "busy", start, errCopyBusy)
	}
	rctx, cancel := j.writeCtx(ctx)
	_, claimRev, err := j.reg.HeldClaim(rctx, k, claim.Token)
	cancel()
	if err != nil {
		return j.copied(job, "failed", start, fmt.Errorf("read back the claim: %w", err))
	}
	// The claim lives ttl: past it a READY record could no longer be written.
	cctx, cancel := context.WithTimeout(ctx, ttl)
	defer cancel()
	attrs, err := j.copyBytes(cctx, job, claim)
	if err != nil {
		j.releaseCopy(ctx, claim, claimRev, 0, false)
		return j.copied(job, "failed", start, err)
	}
	_, verr := j.verifyStored(cctx, blob.Claim{Bucket: claim.Bucket, Name: claim.ObjectName, MediaType: claim.MediaType, Key: k,
		Size: job.src.Size, SHA256: job.src.SHA256[:], SHA1: job.src.SHA1[:], CRC32C: job.src.CRC32C, Generation: attrs.Generation})
	if verr != nil {
		// Bytes that do not match the record are deleted; an unanswered check leaves them for
		// the next attempt to verify and adopt.
		mismatch := errors.Is(verr, blob.ErrMismatch) || errors.Is(verr, blob.ErrNotFound)
		j.releaseCopy(ctx, claim, claimRev, attrs.Generation, mismatch)
		return j.copied(job, "unverified", start, fmt.Errorf("verify the copy: %w", verr))
	}
	now := j.cfg.Now()
	obj := &pb.StoredObject{Key: k, Target: job.dst.Name, State: pb.ObjectState_OBJECT_STATE_READY, Size: job.src.Size,
		MediaType: claim.MediaType, Sha256: job.src.SHA256[:], Sha1: job.src.SHA1[:], Created: timestamppb.New(now),
		Expires: timestamppb.New(now.Add(ttlOf(snap.Policy(), job.src.Transient))), ObjectName: claim.ObjectName, Bucket: claim.Bucket,
		Generation: attrs.Generation, Crc32C: job.src.CRC32C, TargetUid: job.dst.Uid, Transient: job.src.Transient}
	wctx, cancel = j.writeCtx(ctx)
	_, err = j.reg.CompleteFill(wctx, obj, claimRev)
	cancel()
	if err != nil {
		// The claim expired or was taken over: the bytes are nobody's.
		j.queueGarbage(ctx, claim, attrs.Generation, "copy not recorded")
		return j.copied(job, "failed", start, fmt.Errorf("record the copy: %w", err))
	}
	j.cfg.Log.Debug("object copied", "key", k, "from", job.src.Target(), "target", job.dst.Name, "reason", job.reason,
		"size", job.src.Size, "took", time.Since(start))
	return j.copied(job, "ready", start, nil)
}

// copyBytes makes the server-side copy, or finds the bytes already at the destination (a copy or
// fill that stored them and never recorded them: verification decides whether they are adopted).
// It stats first because not every GCS-API server honours the copy's does-not-exist condition.
func (j *term) copyBytes(ctx context.Context, job copyJob, claim *pb.FillClaim) (blob.Attrs, error) {
	attrs, err := j.cfg.Store.Stat(ctx, claim.Bucket, claim.ObjectName)
	if err == nil {
		return attrs, nil
	}
	if !errors.Is(err, blob.ErrNotFound) {
		return blob.Attrs{}, fmt.Errorf("stat the destination: %w", err)
	}
	attrs, err = j.cfg.Store.Copy(ctx, job.src.Home().Bucket, job.src.ObjectName(job.key), job.src.Generation, claim.Bucket, claim.ObjectName)
	if errors.Is(err, blob.ErrExists) {
		return j.cfg.Store.Stat(ctx, claim.Bucket, claim.ObjectName)
	}
	return attrs, err
}

// copied counts a copy's outcome and returns err.
func (j *term) copied(job copyJob, outcome string, start time.Time, err error) error {
	j.metrics.copies.WithLabelValues(job.reason, outcome).Inc()
	if outcome == "ready" {
		j.metrics.copyDuration.WithLabelValues(job.reason).Observe(time.Since(start).Seconds())
	}
	return err
}

// releaseCopy releases a copy's claim and, when deleteBytes is set, queues the bytes it stored.
func (j *term) releaseCopy(ctx context.Context, claim *pb.FillClaim, claimRev, generation int64, deleteBytes bool) {
	var g *pb.GarbageObject
	if deleteBytes {
		g = &pb.GarbageObject{Bucket: claim.Bucket, ObjectName: claim.ObjectName, Generation: generation, Target: claim.Target,
			Reason: "rejected copy", Queued: timestamppb.New(j.cfg.Now())}
	}
	wctx, cancel := j.writeCtx(context.WithoutCancel(ctx))
	defer cancel()
	if err := j.reg.ReleaseClaim(wctx, claim.Key, claimRev, g); err != nil {
		j.cfg.Log.Warn("cannot release a copy's claim; it expires with its lease", "key", claim.Key, "err", err)
	}
}

func (j *term) queueGarbage(ctx context.Context, claim *pb.FillClaim, generation int64, reason string) {
	wctx, cancel := j.writeCtx(context.WithoutCancel(ctx))
	defer cancel()
	g := &pb.GarbageObject{Bucket: claim.Bucket, ObjectName: claim.ObjectName, Generation: generation, Target: claim.Target,
		Reason: reason, Queued: timestamppb.New(j.cfg.Now())}
	if err := j.reg.QueueGarbage(wctx, g); err != nil {
		j.cfg.Log.Warn("cannot queue unrecorded bytes for deletion; the reconciler will find them", "key", claim.Key, "err", err)
	}
}

// soleCopy is a copy at a draining target whose key has no copy at an active one.
type soleCopy struct {
	key  targets.Key
	obj  targets.Object
	from *pb.Target
}

// drainScan walks the index once. For every draining target it counts its live copies and its sole
// copies (keys with no live copy at an ACTIVE target, whatever its health); it returns up to limit
// sole copies whose key is not being filled or copied, to migrate. Without draining targets it
// costs nothing.
func drainScan(snap *targets.Snapshot, now time.Time, limit int) (map[string]*pb.DrainProgress, []soleCopy) {
	progress := map[string]*pb.DrainProgress{}
	for _, t := range snap.Targets() {
		if t.State == pb.TargetState_TARGET_STATE_DRAINING {
			progress[t.Name] = &pb.DrainProgress{}
		}
	}
	if len(progress) == 0 {
		return nil, nil
	}
	var sole []soleCopy
	nowNs := now.UnixNano()
	snap.EachKey(func(key targets.Key, copies []targets.Object) bool {
		var draining []int
		active := false
		for i := range copies {
			o := &copies[i]
			t, ok := snap.Target(o.Target())
			if !ok || !o.Servable(t) || (o.Expires != 0 && o.Expires <= nowNs) {
				continue
			}
			switch t.State {
			case pb.TargetState_TARGET_STATE_ACTIVE:
				active = true
			case pb.TargetState_TARGET_STATE_DRAINING:
				draining = append(draining, i)
				progress[t.Name].Copies++
			}
		}
		if active || len(draining) == 0 {
			return true
		}
		for _, i := range draining {
			progress[copies[i].Target()].SoleCopies++
		}
		if len(sole) < limit {
			if _, held := snap.Claim(key.String()); !held {
				from, _ := snap.Target(copies[draining[0]].Target())
				sole = append(sole, soleCopy{key: key, obj: copies[draining[0]], from: from})
			}
		}
		return true
	})
	return progress, sole
}
