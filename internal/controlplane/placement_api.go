package controlplane

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/placement"
	"github.com/detourhq/detour/internal/targets"
)

// MediaTypeCBOR is what a fill is stored as when the Place request names no media type: agents
// from before PlaceRequest.media_type spoke only Mercurial's protocol version 2, whose responses
// are CBOR values. The control plane knows no protocol otherwise: the media type of a fill is the
// request's, and its report must repeat it.
const MediaTypeCBOR = "application/mercurial-cbor"

// ReasonLoading answers Place inline while this replica loads its first snapshot.
const ReasonLoading = "loading"

// maxCommandLen bounds PlaceRequest.command, a label for logs and metrics.
const maxCommandLen = 128

// ReasonNotAdmitted answers a miss inline without a fill: the key has not been missed the policy's
// min_occurrences times within its admission window yet.
const ReasonNotAdmitted = "not_admitted"

// Place answers one placement question from the snapshot; on a miss with a fill target it records
// a fleet-wide fill claim in etcd.
func (s *Service) Place(ctx context.Context, req *pb.PlaceRequest) (*pb.PlaceResponse, error) {
	start := time.Now()
	if err := targets.ValidateKey("key", req.Key); err != nil {
		return nil, toStatus(err)
	}
	if len(req.Command) > maxCommandLen {
		return nil, invalidArg("command", "is longer than %d bytes", maxCommandLen)
	}
	if req.MediaType != "" {
		if err := validateMediaType("media_type", req.MediaType); err != nil {
			return nil, err
		}
	}
	snap := s.w.Snapshot()
	// While the snapshot loads, a clean stop's checkpoint may be served (targets.ServeCleanStop):
	// redirects from it, nothing that writes.
	provisional := snap.Provisional()
	if s.loading() && !provisional {
		// Agents stay fail-open: an answer at once, inline, rather than a deadline spent waiting.
		s.metrics.decisions.WithLabelValues(resultLabel(pb.PlaceResult_PLACE_RESULT_INLINE), ReasonLoading).Inc()
		return &pb.PlaceResponse{Result: pb.PlaceResult_PLACE_RESULT_INLINE, Reason: ReasonLoading}, nil
	}
	key, _ := targets.ParseKey(req.Key)
	v := s.viewOf(snap)
	objs := servable(snap, snap.Copies(key))
	copies := make([]placement.Copy, len(objs))
	for i, o := range objs {
		copies[i] = placement.Copy{Target: o.Target(), Size: o.Size, Expires: o.ExpiresAt()}
	}
	now := s.cfg.Now()
	d := v.fleet.Decide(copies, placement.Request{Key: req.Key, Accepted: req.AcceptedTargets,
		Region: req.AgentRegion, SizeHint: req.SizeHint, Now: now})
	if d.Fill != "" && slices.Contains(req.UnfillableTargets, d.Fill) {
		// The agent's uploads to that target are failing: choose among the others. There is no
		// copy to redirect to (a fill was chosen), so only the accepted list matters.
		accepted := slices.DeleteFunc(slices.Clone(req.AcceptedTargets), func(n string) bool { return slices.Contains(req.UnfillableTargets, n) })
		d = v.fleet.Decide(nil, placement.Request{Key: req.Key, Accepted: accepted,
			Region: req.AgentRegion, SizeHint: req.SizeHint, Now: now})
	}
	resp := &pb.PlaceResponse{Result: pb.PlaceResult_PLACE_RESULT_INLINE, Reason: string(d.Reason), SnapshotRevision: snap.Revision}
	switch {
	case d.Result == placement.Redirect:
		s.redirect(ctx, resp, snap, key, objs, d, req.AgentRegion, now)
		if resp.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
			s.countRedirect(v, key, req.AgentRegion, resp.Target, now)
		}
	case d.Fill != "" && provisional:
		resp.Reason = ReasonLoading // a claim needs etcd
	case d.Fill != "" && req.CanFill != nil && !*req.CanFill:
		resp.Reason = "agent_cannot_fill"
	case d.Fill != "":
		s.grantFill(ctx, resp, snap, v, req, d.Fill, now)
		if resp.Fill != nil && d.Reason == placement.ReasonFillRemote {
			s.metrics.crossRegionFills.WithLabelValues(v.targets[d.Fill].Region).Inc()
		}
	}
	if req.OriginRequiresCredentials && resp.Target != "" && (resp.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT || resp.Fill != nil) {
		if t, ok := snap.Target(resp.Target); ok {
			s.noteExposure(t, now)
		}
	}
	s.metrics.decisions.WithLabelValues(resultLabel(resp.Result), resp.Reason).Inc()
	s.metrics.latency.Observe(time.Since(start).Seconds())
	return resp, nil
}

// servable keeps the copies that are where their target keeps objects now (Object.Servable).
func servable(snap *targets.Snapshot, objs []targets.Object) []*targets.Object {
	out := make([]*targets.Object, 0, len(objs))
	for i := range objs {
		if t, ok := snap.Target(objs[i].Target()); ok && objs[i].Servable(t) {
			out = append(out, &objs[i])
		}
	}
	return out
}

func resultLabel(r pb.PlaceResult) string {
	if r == pb.PlaceResult_PLACE_RESULT_REDIRECT {
		return "redirect"
	}
	return "inline"
}

func (s *Service) redirect(ctx context.Context, resp *pb.PlaceResponse, snap *targets.Snapshot, key targets.Key, objs []*targets.Object, d placement.Decision, region string, now time.Time) {
	var obj *targets.Object
	for _, o := range objs {
		if o.Target() == d.Copy.Target {
			obj = o
		}
	}
	t, ok := snap.Target(d.Copy.Target)
	if obj == nil || !ok {
		resp.Reason = "internal_inconsistency"
		return
	}
	if !s.guard.admit(ctx, key, obj) {
		resp.Reason = ReasonUnverified
		return
	}
	// Built from where the record says the bytes are, not from the target's current settings, and
	// naming the generation that was verified where the URL form allows.
	url, err := blob.LocationURLAt(t, obj.Home().Bucket, obj.ObjectName(key), obj.Generation, s.cfg.Signer, now,
		policyDuration(snap.Policy().SignedUrlTtl, targets.DefaultSignedURLTTL))
	if err != nil {
		s.once.Warn("location:"+t.Name, "cannot build location URLs for target; answering inline",
			"target", t.Name, "err", err)
		resp.Reason = "location_failed"
		return
	}
	resp.Result = pb.PlaceResult_PLACE_RESULT_REDIRECT
	resp.Target = t.Name
	resp.Location = &pb.Location{Url: url, MediaType: obj.Home().MediaType, Size: obj.Size,
		Sha256: append([]byte(nil), obj.SHA256[:]...), Sha1: append([]byte(nil), obj.SHA1[:]...),
		Generation: obj.Generation, Crc32C: obj.CRC32C}
	if d := s.cacheFor(snap, t, obj, region, now); d > 0 {
		resp.CacheFor = durationpb.New(d)
	}
	s.extender.used(key, obj, now, ttlOf(snap.Policy(), obj.Transient))
}

// cacheFor is how long an agent may reuse a redirect to obj at t without asking: a READY object is
// immutable, and every change that ends a redirect's validity reaches agents as an invalidation
// on WatchTargets. Bounded by the object's expiry and a quarter of a signed URL's lifetime; zero
// for redirects across regions (each one counts toward an in-region copy) and to draining targets
// (the next answer may name a new copy).
func (s *Service) cacheFor(snap *targets.Snapshot, t *pb.Target, obj *targets.Object, region string, now time.Time) time.Duration {
	d := s.cfg.RedirectCacheMaxAge
	switch {
	case d <= 0, t.Region != region, t.State != pb.TargetState_TARGET_STATE_ACTIVE:
		return 0
	}
	if t.GetUrlForm().GetSigned() != nil {
		d = min(d, policyDuration(snap.Policy().SignedUrlTtl, targets.DefaultSignedURLTTL)/4)
	}
	if obj.Expires != 0 {
		d = min(d, time.Unix(0, obj.Expires).Sub(now))
	}
	return max(d, 0)
}

func (s *Service) grantFill(ctx context.Context, resp *pb.PlaceResponse, snap *targets.Snapshot, v *view, req *pb.PlaceRequest, target string, now time.Time) {
	if s.cfg.Store == nil {
		// A fill this replica cannot verify would never become READY.
		resp.Reason = "no_store_access"
		return
	}
	holder := callerID(ctx)
	who := holder
	if who == "" {
		who = req.AgentId
	}
	if ctx.Err() != nil {
		// The caller has gone: a parked claim stays for its next Place.
		s.claimCancelled(resp, nil)
		return
	}
	ttl := policyDuration(snap.Policy().FillClaimTtl, targets.DefaultFillClaimTTL)
	if c, ok := s.parked.take(req.Key, who); ok {
		if c.claim.Target == target && c.ttl >= ttl/2 {
			s.metrics.fills.WithLabelValues("parked_handed").Inc()
			s.grantOf(resp, c.claim, c.ttl)
			return
		}
		// Placement now chooses another target (the claimed one is unhealthy, draining or
		// refused by the agent), or the claim has too little of its lease left for an upload:
		// it is of no use.
		s.metrics.fills.WithLabelValues("parked_released").Inc()
		s.releaseOrphan(c.claim)
		resp.Reason = string(placement.ReasonFillInProgress)
		return
	}
	if _, held := snap.Claim(req.Key); held {
		resp.Reason = string(placement.ReasonFillInProgress)
		return
	}
	// Most keys missed once are never asked for again: storing them would cost an etcd write, an
	// upload and a report each for nothing. Counting is in memory and costs no write.
	if a := v.admission; a.minOccurrences > 1 && s.misses.Observe(req.Key, now, a.window) < a.minOccurrences {
		s.metrics.fills.WithLabelValues("not_admitted").Inc()
		resp.Reason = ReasonNotAdmitted
		return
	}
	if s.claims != nil {
		if !s.claims.allow(who, now) {
			s.metrics.fills.WithLabelValues("rate_limited").Inc()
			s.once.Warn("claim-rate:"+who, "an agent takes fill claims faster than --claim-rate allows; its misses go inline without fills",
				"agent", who)
			resp.Reason = "claim_rate_limited"
			return
		}
	}
	t, _ := snap.Target(target)
	mediaType := req.MediaType
	if mediaType == "" {
		mediaType = MediaTypeCBOR
	}
	claim := &pb.FillClaim{Key: req.Key, Target: target, AgentId: req.AgentId, Holder: holder, Token: targets.NewToken(),
		ObjectName: blob.ObjectName(t.GetStore().GetPrefix(), req.Key), Bucket: t.GetStore().GetBucket(),
		MediaType: mediaType, TargetUid: t.GetUid(), Granted: timestamppb.New(now), Transient: req.Transient}
	// With etcd unreachable a claim can only time out: after a failure, skip claims for a while
	// so that Place keeps answering at snapshot speed.
	if until := s.claimsBrokenUntil.Load(); until != 0 && now.UnixNano() < until {
		resp.Reason = string(placement.ReasonClaimFailed)
		return
	}
	// Leave the caller at least half of its deadline to use the answer. The write itself is not
	// bound by the caller's deadline: an etcd that commits more slowly than an agent waits (50ms
	// by default) would otherwise never grant a fill at all. A grant that comes after the caller
	// was answered is kept for its next Place of the key (parked.go).
	patience := s.cfg.ClaimTimeout
	if dl, ok := ctx.Deadline(); ok {
		patience = min(patience, time.Until(dl)/2)
	}
	call, reason := s.startClaim(ctx, claim, ttl, who)
	if call == nil {
		resp.Reason = reason
		return
	}
	wait := time.NewTimer(patience)
	defer wait.Stop()
	var (
		res claimResult
		ok  bool
	)
	select {
	case res = <-call.result:
	case <-ctx.Done():
		if res, ok = call.leave(leftCancelled); !ok {
			// The caller cancelled (a client that hung up, an agent shutting down) or its deadline
			// passed: the claim, if written, is released when its write ends.
			s.claimCancelled(resp, nil)
			return
		}
	case <-wait.C:
		if res, ok = call.leave(leftWaiting); !ok {
			resp.Reason = ReasonClaimPending
			return
		}
	}
	switch {
	case res.err != nil:
		resp.Reason = string(placement.ReasonClaimFailed)
	case !res.granted:
		resp.Reason = string(placement.ReasonFillInProgress)
	case ctx.Err() != nil:
		// The agent stopped waiting before the grant reached it: release the claim at once
		// instead of blocking the key's fills for the claim's TTL.
		s.claimCancelled(resp, claim)
	default:
		s.grantOf(resp, claim, ttl)
	}
}

// grantOf makes resp the grant of claim.
func (s *Service) grantOf(resp *pb.PlaceResponse, claim *pb.FillClaim, ttl time.Duration) {
	resp.Target = claim.Target
	resp.Fill = &pb.FillGrant{Target: claim.Target, Bucket: claim.Bucket, ObjectName: claim.ObjectName,
		Token: claim.Token, Ttl: durationpb.New(ttl), MediaType: claim.MediaType}
}

// ReasonClaimPending answers a Place whose fill claim was still being written when the caller's
// patience (half its deadline) ran out. If the claim is granted, the caller's next Place of the
// key is handed it.
const ReasonClaimPending = "claim_pending"

// ReasonCancelled answers a Place whose caller went away before its fill claim was settled: the
// claim, if written, is released at once, and the answer reaches nobody.
const ReasonCancelled = "cancelled"

// claimCancelled answers a Place whose caller has gone and releases its claim, which may have
// been written (c nil: no claim was attempted). It is counted apart from etcd's failures.
func (s *Service) claimCancelled(resp *pb.PlaceResponse, c *pb.FillClaim) {
	s.metrics.fills.WithLabelValues("cancelled").Inc()
	resp.Reason = ReasonCancelled
	if c != nil {
		s.releaseOrphan(c)
	}
}

// releaseOrphan queues for release a claim that no agent knows it holds (runOrphanReleases
// releases it in the background). When the queue is full the claim expires with its lease.
func (s *Service) releaseOrphan(c *pb.FillClaim) {
	select {
	case s.orphans <- c:
		s.metrics.fills.WithLabelValues("orphan_released").Inc()
	default:
		s.metrics.fills.WithLabelValues("orphan_left").Inc()
	}
}

// orphanReleasesInFlight bounds the orphaned claims released at once.
const orphanReleasesInFlight = 4

// runOrphanReleases releases queued orphaned claims until ctx ends, and then those still queued
// and the parked ones within a couple of seconds.
func (s *Service) runOrphanReleases(ctx context.Context) {
	var g errgroup.Group
	g.SetLimit(orphanReleasesInFlight)
	defer g.Wait()
	release := func(ctx context.Context, c *pb.FillClaim) {
		g.Go(func() error {
			wctx, cancel := s.writeCtx(ctx)
			defer cancel()
			if err := s.reg.AbortFill(wctx, c.Key, c.Token); err != nil && !errors.Is(err, targets.ErrClaimNotHeld) {
				s.cfg.Log.Debug("orphaned claim not released; it expires with its lease", "key", c.Key, "err", err)
			}
			return nil
		})
	}
	for {
		select {
		case <-ctx.Done():
			// At a stop (etcd is still open), the parked claims and those still queued are
			// released within a couple of seconds: left, each would block its key's fills for
			// the claim's TTL.
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			defer func() { g.Wait(); cancel() }() // before the cancel: the releases use sctx
			left := s.parked.takeAll()
			for drained := false; !drained; {
				select {
				case c := <-s.orphans:
					left = append(left, c)
				default:
					drained = true
				}
			}
			for _, c := range left {
				release(sctx, c)
			}
			return
		case c := <-s.orphans:
			release(ctx, c)
		}
	}
}

// ReportFill marks a filled object READY once it is verified: the reporter holds the claim, the
// report names what the claim granted (target, object, media type), the target is still the one
// the claim was granted for, and the store holds exactly the reported object (generation, size,
// CRC32C, and the SHA-256, SHA-1 and key recorded with it; with --verify-fills, the bytes
// themselves). A report that fails any check releases the claim and queues the object for deletion.
func (s *Service) ReportFill(ctx context.Context, req *pb.ReportFillRequest) (*pb.ReportFillResponse, error) {
	if err := validateReport(req); err != nil {
		return nil, err
	}
	claim, claimRev, err := s.reg.HeldClaim(ctx, req.Key, req.Token)
	if err != nil {
		s.metrics.fills.WithLabelValues("rejected").Inc()
		return nil, toStatus(err)
	}
	if err := s.checkHolder(ctx, claim); err != nil {
		return nil, err
	}
	// What the claim granted is the only thing a report may name.
	switch {
	case req.Target != claim.Target:
		return nil, s.rejectFill(ctx, claim, claimRev, invalidArg("target", "%q is not the granted target %q", req.Target, claim.Target))
	case req.ObjectName != "" && req.ObjectName != claim.ObjectName:
		return nil, s.rejectFill(ctx, claim, claimRev, invalidArg("object_name", "%.80q is not the granted object %q", req.ObjectName, claim.ObjectName))
	case req.MediaType != claim.MediaType:
		return nil, s.rejectFill(ctx, claim, claimRev, invalidArg("media_type", "%.80q is not the granted %q", req.MediaType, claim.MediaType))
	}
	snap := s.w.Snapshot()
	if t, ok := snap.Target(claim.Target); !ok || t.Uid != claim.TargetUid || t.GetStore().GetBucket() != claim.Bucket {
		return nil, s.rejectFill(ctx, claim, claimRev, status.Errorf(codes.FailedPrecondition,
			"target %q was deleted or its store changed since the fill was granted", claim.Target))
	}
	if s.cfg.Store == nil {
		return nil, s.rejectFill(ctx, claim, claimRev, status.Error(codes.FailedPrecondition, "this control plane has no store access to verify fills"))
	}
	full, verr := s.verifyStored(ctx, blob.Claim{Bucket: claim.Bucket, Name: claim.ObjectName, MediaType: claim.MediaType, Key: req.Key,
		Size: req.Size, SHA256: req.Sha256, SHA1: req.Sha1, CRC32C: req.Crc32C, Generation: req.Generation})
	switch {
	case errors.Is(verr, blob.ErrMismatch), errors.Is(verr, blob.ErrNotFound):
		return nil, s.rejectFill(ctx, claim, claimRev, status.Errorf(codes.FailedPrecondition, "fill verification failed: %v", verr))
	case verr != nil:
		// The store could not be asked: the claim stays, the agent may report again.
		s.metrics.fills.WithLabelValues("unverified").Inc()
		return nil, status.Errorf(codes.Unavailable, "cannot verify the fill against the store: %v", verr)
	}
	now := s.cfg.Now()
	obj := &pb.StoredObject{Key: req.Key, Target: claim.Target, State: pb.ObjectState_OBJECT_STATE_READY, Size: req.Size,
		MediaType: claim.MediaType, Sha256: req.Sha256, Sha1: req.Sha1, Created: timestamppb.New(now),
		Expires: timestamppb.New(now.Add(ttlOf(snap.Policy(), claim.Transient))), ObjectName: claim.ObjectName, Bucket: claim.Bucket,
		Generation: req.Generation, Crc32C: req.Crc32C, TargetUid: claim.TargetUid, Transient: claim.Transient}
	wctx, cancel := s.writeCtx(ctx)
	defer cancel()
	rev, err := s.reg.CompleteFill(wctx, obj, claimRev)
	if err != nil {
		s.metrics.fills.WithLabelValues("rejected").Inc()
		return nil, toStatus(err)
	}
	// Not settled: a fill's report does not wait for this replica's watch (after an etcd leader
	// change the watch can lag the writes by seconds, and fills would stop completing meanwhile).
	s.wrote(rev)
	s.metrics.fills.WithLabelValues("ready").Inc()
	s.cfg.Log.Info("object ready", "key", req.Key, "target", claim.Target, "size", req.Size, "generation", req.Generation, "full_verify", full,
		"transient", claim.Transient)
	return &pb.ReportFillResponse{Object: obj}, nil
}

// verifyStored checks that the store holds the object c describes (see blob.Store.Verify); a
// VerifyFullFraction share of objects is also read back and hashed (full). Fills and copies alike.
func (d *deps) verifyStored(ctx context.Context, c blob.Claim) (full bool, err error) {
	full = d.cfg.VerifyFullFraction >= 1 || (d.cfg.VerifyFullFraction > 0 && rand.Float64() < d.cfg.VerifyFullFraction)
	start := time.Now()
	err = d.cfg.Store.Verify(ctx, c, full)
	d.metrics.verify.WithLabelValues(strconv.FormatBool(full)).Observe(time.Since(start).Seconds())
	return full, err
}

func validateReport(req *pb.ReportFillRequest) error {
	if err := targets.ValidateKey("key", req.Key); err != nil {
		return toStatus(err)
	}
	switch {
	case req.Target == "":
		return invalidArg("target", "is required")
	case req.Token == "":
		return invalidArg("token", "is required")
	case len(req.Token) > 64:
		return invalidArg("token", "is longer than 64 bytes")
	case req.Size == 0:
		return invalidArg("size", "must be greater than 0")
	case len(req.Sha256) != 32:
		return invalidArg("sha256", "must be 32 bytes, got %d", len(req.Sha256))
	case len(req.Sha1) != 20:
		return invalidArg("sha1", "must be 20 bytes, got %d", len(req.Sha1))
	case req.MediaType == "":
		return invalidArg("media_type", "is required")
	case req.Generation <= 0:
		return invalidArg("generation", "must be the generation the store committed")
	}
	return nil
}

// rejectFill releases a claim whose report failed verification and queues whatever the fill
// stored for deletion, so the key can be filled again at once; it returns err.
func (s *Service) rejectFill(ctx context.Context, claim *pb.FillClaim, claimRev int64, err error) error {
	s.metrics.fills.WithLabelValues("rejected").Inc()
	s.cfg.Log.Warn("fill report rejected", "key", claim.Key, "target", claim.Target, "agent", claim.AgentId, "err", err)
	wctx, cancel := s.writeCtx(context.WithoutCancel(ctx))
	defer cancel()
	// Generation 0: any bytes at the granted name are the failed fill's (the name is the key's).
	g := &pb.GarbageObject{Bucket: claim.Bucket, ObjectName: claim.ObjectName, Target: claim.Target,
		Reason: "rejected fill", Queued: timestamppb.New(s.cfg.Now())}
	if rerr := s.reg.ReleaseClaim(wctx, claim.Key, claimRev, g); rerr != nil {
		s.cfg.Log.Warn("cannot release a rejected claim; it expires with its lease", "key", claim.Key, "err", rerr)
	}
	return err
}

// checkHolder refuses a report or abort from anyone but the agent the claim was granted to: a
// token is a secret, but a certificate is proof.
func (s *Service) checkHolder(ctx context.Context, claim *pb.FillClaim) error {
	if claim.Holder == "" {
		return nil
	}
	if who := callerID(ctx); who != claim.Holder {
		s.metrics.rejections.WithLabelValues("not_claim_holder").Inc()
		s.cfg.Log.Warn("fill report or abort from an agent that does not hold the claim", "key", claim.Key,
			"holder", claim.Holder, "caller", who)
		return status.Errorf(codes.PermissionDenied, "the fill claim on %s is held by another agent", claim.Key)
	}
	return nil
}

// AbortFill releases a claim.
func (s *Service) AbortFill(ctx context.Context, req *pb.AbortFillRequest) (*pb.AbortFillResponse, error) {
	if err := targets.ValidateKey("key", req.Key); err != nil {
		return nil, toStatus(err)
	}
	if req.Token == "" {
		return nil, invalidArg("token", "is required")
	}
	wctx, cancel := s.writeCtx(ctx)
	defer cancel()
	claim, rev, err := s.reg.HeldClaim(wctx, req.Key, req.Token)
	if err != nil {
		return nil, toStatus(err)
	}
	if err := s.checkHolder(ctx, claim); err != nil {
		return nil, err
	}
	if err := s.reg.ReleaseClaim(wctx, req.Key, rev, nil); err != nil {
		return nil, toStatus(err)
	}
	s.metrics.fills.WithLabelValues("aborted").Inc()
	s.cfg.Log.Info("fill aborted", "key", req.Key, "reason", req.Reason)
	return &pb.AbortFillResponse{}, nil
}

// WatchTargets sends the full target set, then again at every change of a target, its liveness
// or the policy; between those, the object records removed or replaced since the last message
// (invalidations of the redirects agents cache). A stream that asks to resume from the revision
// its agent last applied, when the target set has not changed since then and the invalidations
// since then are all still held, starts with the target set marked resumed at that revision and
// goes on with those invalidations, so the agent keeps what it cached; any other stream starts
// with an ordinary target set (which ends every cached redirect).
func (s *Service) WatchTargets(req *pb.WatchTargetsRequest, stream pb.PlacementService_WatchTargetsServer) error {
	if req.ResumeRevision < 0 {
		return invalidArg("resume_revision", "%d is negative", req.ResumeRevision)
	}
	ctx := stream.Context()
	snap := s.readSnapshot(ctx)
	last, sent := int64(-1), int64(0)
	if r := req.ResumeRevision; r > 0 {
		if snap.Revision < r {
			// The agent applied a revision this replica has not seen yet: catch up briefly.
			snap = s.awaitRevision(ctx, r, time.Second)
		}
		if msg := s.resumption(snap, r); msg != nil {
			if err := stream.Send(msg); err != nil {
				return err
			}
			last, sent = snap.TargetsRevision, snap.Revision
		}
	}
	start := "resumed"
	if last < 0 {
		start = "full"
	}
	s.metrics.watchStarts.WithLabelValues(start).Inc()
	for {
		switch {
		case snap.TargetsRevision != last:
			// A target set ends every cached redirect, so it also covers the invalidations up to it.
			if err := stream.Send(targetSet(snap)); err != nil {
				return err
			}
			last, sent = snap.TargetsRevision, snap.Revision
		case snap.Revision > sent:
			if err := s.sendInvalidations(stream, sent, snap.Revision); err != nil {
				return err
			}
			sent = snap.Revision
		}
		select {
		case <-snap.Superseded():
			snap = s.w.Snapshot()
		case <-ctx.Done():
			return nil
		case <-s.stopping:
			return status.Error(codes.Unavailable, "the control plane is shutting down; reconnect to another replica")
		}
	}
}

// resumption is the first message of a stream that resumes from revision r: the target set at
// snap with every invalidation after r up to snap, in one message, so that an agent never holds
// its cached redirects valid while an invalidation it missed is still on its way. nil: the stream
// cannot resume (see resumable), or the invalidations do not fit one message.
func (s *Service) resumption(snap *targets.Snapshot, r int64) *pb.WatchTargetsResponse {
	if !s.resumable(snap, r) {
		return nil
	}
	xs, _ := s.w.InvalidationsSince(r)
	msg := targetSet(snap)
	msg.Resumed = true
	for _, x := range xs {
		if x.Revision > snap.Revision {
			break
		}
		if len(msg.Invalidations) == maxInvalidationsPerMessage {
			return nil
		}
		msg.Invalidations = append(msg.Invalidations, &pb.Invalidation{Key: x.Key.String(), Target: x.Target, Revision: x.Revision})
	}
	return msg
}

// resumable reports whether a stream may resume from revision r with snap: snap has reached r, the
// target set has not changed since r, and the watcher still holds every invalidation after r.
// (After a replica loads a snapshot, its target set counts as changed at the load's revision and
// its invalidations start there: a stream resumes only from revisions it watched.)
func (s *Service) resumable(snap *targets.Snapshot, r int64) bool {
	if snap.Revision < r || snap.TargetsRevision > r {
		return false
	}
	_, complete := s.w.InvalidationsSince(r)
	return complete
}

// targetSet is the message that carries snap's target set.
func targetSet(snap *targets.Snapshot) *pb.WatchTargetsResponse {
	msg := &pb.WatchTargetsResponse{Revision: snap.Revision, RegionPreference: snap.Policy().RegionPreference}
	for _, t := range snap.Targets() {
		msg.Targets = append(msg.Targets, proto.Clone(t).(*pb.Target))
	}
	return msg
}

// maxInvalidationsPerMessage keeps each message well under gRPC's default 4 MiB limit.
const maxInvalidationsPerMessage = 20000

// sendInvalidations sends the invalidations in (from, to]; if the watcher no longer holds them
// all, it tells the agent to drop everything instead.
func (s *Service) sendInvalidations(stream pb.PlacementService_WatchTargetsServer, from, to int64) error {
	xs, complete := s.w.InvalidationsSince(from)
	if !complete {
		s.metrics.invalidations.WithLabelValues("flush").Inc()
		return stream.Send(&pb.WatchTargetsResponse{Revision: to, InvalidationsOnly: true, Flush: true})
	}
	msg := &pb.WatchTargetsResponse{Revision: to, InvalidationsOnly: true}
	for _, x := range xs {
		if x.Revision > to {
			break
		}
		msg.Invalidations = append(msg.Invalidations, &pb.Invalidation{Key: x.Key.String(), Target: x.Target, Revision: x.Revision})
		if len(msg.Invalidations) == maxInvalidationsPerMessage {
			if err := stream.Send(msg); err != nil {
				return err
			}
			msg = &pb.WatchTargetsResponse{Revision: to, InvalidationsOnly: true}
		}
	}
	if len(msg.Invalidations) == 0 {
		return nil
	}
	s.metrics.invalidations.WithLabelValues("sent").Add(float64(len(msg.Invalidations)))
	return stream.Send(msg)
}

// Heartbeat keeps a heartbeat target healthy.
func (s *Service) Heartbeat(ctx context.Context, req *pb.HeartbeatRequest) (*pb.HeartbeatResponse, error) {
	if err := targets.ValidateName("target", req.Target); err != nil {
		return nil, toStatus(err)
	}
	ttl := req.Ttl.AsDuration()
	if req.Ttl == nil {
		ttl = 10 * time.Second
	}
	if ttl < time.Second || ttl > 5*time.Minute {
		return nil, invalidArg("ttl", "%s is not between 1s and 5m", ttl)
	}
	wctx, cancel := s.writeCtx(ctx)
	defer cancel()
	if err := s.reg.Heartbeat(wctx, req.Target, ttl); err != nil {
		return nil, toStatus(err)
	}
	return &pb.HeartbeatResponse{Ttl: durationpb.New(ttl)}, nil
}

// ReportBrokenLocation checks a location an agent found broken against the store: if the object
// is missing, or is not the generation, size and CRC32C the record says, the record is retired at
// once and no redirect names it again. A healthy object is left alone (the agent may have seen a
// passing fault), so an agent cannot remove objects that are fine.
func (s *Service) ReportBrokenLocation(ctx context.Context, req *pb.ReportBrokenLocationRequest) (*pb.ReportBrokenLocationResponse, error) {
	if err := targets.ValidateKey("key", req.Key); err != nil {
		return nil, toStatus(err)
	}
	if err := targets.ValidateName("target", req.Target); err != nil {
		return nil, toStatus(err)
	}
	if len(req.Reason) > 512 {
		return nil, invalidArg("reason", "is longer than 512 bytes")
	}
	if s.cfg.Store == nil {
		return nil, status.Error(codes.FailedPrecondition, "this control plane has no store access to check objects")
	}
	key, _ := targets.ParseKey(req.Key)
	snap := s.w.Snapshot()
	t, ok := snap.Target(req.Target)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "target %q: not found", req.Target)
	}
	obj := copyAt(snap, key, t)
	if obj == nil {
		return &pb.ReportBrokenLocationResponse{}, nil
	}
	a, err := s.cfg.Store.Stat(ctx, obj.Home().Bucket, obj.ObjectName(key))
	problem := ""
	switch {
	case errors.Is(err, blob.ErrNotFound):
		problem = "missing"
	case err != nil:
		return nil, status.Errorf(codes.Unavailable, "cannot check the object in the store: %v", err)
	case a.Generation != obj.Generation || a.Size != obj.Size || a.CRC32C != obj.CRC32C:
		problem = fmt.Sprintf("replaced (generation %d, %d bytes)", a.Generation, a.Size)
	}
	if problem == "" {
		s.metrics.broken.WithLabelValues("intact").Inc()
		return &pb.ReportBrokenLocationResponse{}, nil
	}
	wctx, cancel := s.writeCtx(ctx)
	defer cancel()
	n, err := s.reg.Retire(wctx, []targets.Retirement{{Key: req.Key, Target: req.Target, ModRevision: obj.ModRevision,
		Garbage: targets.GarbageOf(obj.Proto(key), "broken", s.cfg.Now())}})
	if err != nil {
		return nil, toStatus(err)
	}
	s.metrics.broken.WithLabelValues("removed").Inc()
	s.metrics.retired.WithLabelValues("broken").Add(float64(n))
	s.cfg.Log.Warn("broken location reported and confirmed; record removed", "key", req.Key, "target", req.Target,
		"problem", problem, "agent_saw", req.Reason)
	return &pb.ReportBrokenLocationResponse{Removed: n > 0}, nil
}

// validateMediaType accepts a media type of the form type/subtype (RFC 6838 restricted names, no
// parameters), at most 127 bytes.
func validateMediaType(field, v string) error {
	if len(v) > 127 {
		return invalidArg(field, "is longer than 127 bytes")
	}
	typ, sub, ok := strings.Cut(v, "/")
	if !ok || !restrictedName(typ) || !restrictedName(sub) {
		return invalidArg(field, "%.80q is not a media type of the form type/subtype (such as %s)", v, MediaTypeCBOR)
	}
	return nil
}

// restrictedName reports whether s is an RFC 6838 restricted-name: a letter or digit, then letters,
// digits and !#$&-^_.+
func restrictedName(s string) bool {
	if s == "" {
		return false
	}
	for i, c := range []byte(s) {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case i > 0 && strings.IndexByte("!#$&-^_.+", c) >= 0:
		default:
			return false
		}
	}
	return true
}
