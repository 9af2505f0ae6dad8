package controlplane

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/placement"
	"github.com/detourhq/detour/internal/targets"
)

// MediaTypeCBOR is the media type of stored objects (the command's CBOR values).
const MediaTypeCBOR = "application/mercurial-cbor"

// Place answers one placement question from the snapshot; on a miss with a fill target it records
// a fleet-wide fill claim in etcd.
func (s *Service) Place(ctx context.Context, req *pb.PlaceRequest) (*pb.PlaceResponse, error) {
	start := time.Now()
	if err := targets.ValidateKey("key", req.Key); err != nil {
		return nil, toStatus(err)
	}
	if req.Command == "" {
		return nil, invalidArg("command", "is required")
	}
	key, _ := targets.ParseKey(req.Key)
	snap := s.w.Snapshot()
	v := s.viewOf(snap)
	objs := snap.Copies(key)
	copies := make([]placement.Copy, len(objs))
	for i := range objs {
		copies[i] = placement.Copy{Target: objs[i].Target, Size: objs[i].Size, Expires: objs[i].ExpiresAt()}
	}
	now := s.cfg.Now()
	d := placement.Decide(v.targets, copies, v.policy, placement.Request{Key: req.Key, Accepted: req.AcceptedTargets,
		Region: req.AgentRegion, SizeHint: req.SizeHint, Now: now})
	resp := &pb.PlaceResponse{Result: pb.PlaceResult_PLACE_RESULT_INLINE, Reason: string(d.Reason), SnapshotRevision: snap.Revision}
	switch {
	case d.Result == placement.Redirect:
		s.redirect(resp, snap, objs, d, now)
	case d.Fill != "":
		s.grantFill(ctx, resp, snap, req, d.Fill, now)
	}
	s.metrics.decisions.WithLabelValues(resultLabel(resp.Result), resp.Reason).Inc()
	s.metrics.latency.Observe(time.Since(start).Seconds())
	return resp, nil
}

func resultLabel(r pb.PlaceResult) string {
	if r == pb.PlaceResult_PLACE_RESULT_REDIRECT {
		return "redirect"
	}
	return "inline"
}

func (s *Service) redirect(resp *pb.PlaceResponse, snap *targets.Snapshot, objs []targets.Object, d placement.Decision, now time.Time) {
	var obj *targets.Object
	for i := range objs {
		if objs[i].Target == d.Copy.Target {
			obj = &objs[i]
		}
	}
	t, ok := snap.Target(d.Copy.Target)
	if obj == nil || !ok {
		resp.Reason = "internal_inconsistency"
		return
	}
	url, err := blob.LocationURL(t, obj.ObjectName, s.cfg.Signer, now,
		policyDuration(snap.Policy().SignedUrlTtl, targets.DefaultSignedURLTTL))
	if err != nil {
		s.warnOnce("location:"+t.Name, "cannot build location URLs for target; answering inline",
			"target", t.Name, "err", err)
		resp.Reason = "location_failed"
		return
	}
	resp.Result = pb.PlaceResult_PLACE_RESULT_REDIRECT
	resp.Target = t.Name
	resp.Location = &pb.Location{Url: url, MediaType: obj.MediaType, Size: obj.Size,
		Sha256: append([]byte(nil), obj.SHA256[:]...), Sha1: append([]byte(nil), obj.SHA1[:]...)}
}

func (s *Service) grantFill(ctx context.Context, resp *pb.PlaceResponse, snap *targets.Snapshot, req *pb.PlaceRequest, target string, now time.Time) {
	if _, held := snap.Claim(req.Key); held {
		resp.Reason = string(placement.ReasonFillInProgress)
		return
	}
	t, _ := snap.Target(target)
	ttl := policyDuration(snap.Policy().FillClaimTtl, targets.DefaultFillClaimTTL)
	claim := &pb.FillClaim{Key: req.Key, Target: target, AgentId: req.AgentId, Token: targets.NewToken(),
		ObjectName: blob.ObjectName(t.GetStore().GetPrefix(), req.Key)}
	// With etcd unreachable a claim can only time out: after a failure, skip claims for a while
	// so that Place keeps answering at snapshot speed.
	if until := s.claimsBrokenUntil.Load(); until != 0 && now.UnixNano() < until {
		resp.Reason = string(placement.ReasonClaimFailed)
		return
	}
	// Leave the caller at least half of its deadline to use the answer.
	timeout := s.cfg.ClaimTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(dl)/2)
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	granted, err := s.reg.Claim(cctx, claim, ttl)
	switch {
	case err != nil:
		s.claimsBrokenUntil.Store(now.Add(time.Second).UnixNano())
		s.warnOnce("claim", "cannot record fill claims; answering inline without fills", "err", err)
		resp.Reason = string(placement.ReasonClaimFailed)
	case !granted:
		resp.Reason = string(placement.ReasonFillInProgress)
	default:
		s.logOnce.Delete("claim")
		resp.Target = target
		resp.Fill = &pb.FillGrant{Target: target, Bucket: t.GetStore().GetBucket(), ObjectName: claim.ObjectName,
			Token: claim.Token, Ttl: durationpb.New(ttl)}
	}
}

// ReportFill marks a filled object READY, if the reporter still holds the claim.
func (s *Service) ReportFill(ctx context.Context, req *pb.ReportFillRequest) (*pb.ReportFillResponse, error) {
	if err := targets.ValidateKey("key", req.Key); err != nil {
		return nil, toStatus(err)
	}
	switch {
	case req.Target == "":
		return nil, invalidArg("target", "is required")
	case req.Token == "":
		return nil, invalidArg("token", "is required")
	case req.Size == 0:
		return nil, invalidArg("size", "must be greater than 0")
	case len(req.Sha256) != 32:
		return nil, invalidArg("sha256", "must be 32 bytes, got %d", len(req.Sha256))
	case len(req.Sha1) != 20:
		return nil, invalidArg("sha1", "must be 20 bytes, got %d", len(req.Sha1))
	case req.MediaType == "":
		return nil, invalidArg("media_type", "is required")
	}
	snap := s.w.Snapshot()
	t, ok := snap.Target(req.Target)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "target %q is not registered", req.Target)
	}
	objectName := req.ObjectName
	if objectName == "" {
		objectName = blob.ObjectName(t.GetStore().GetPrefix(), req.Key)
	}
	if s.cfg.Verifier != nil {
		n, err := s.cfg.Verifier.Size(ctx, t.GetStore().GetBucket(), objectName)
		if err == nil && uint64(n) != req.Size {
			err = fmt.Errorf("stored object has %d bytes, the report says %d", n, req.Size)
		}
		if err != nil {
			s.metrics.fills.WithLabelValues("unverified").Inc()
			return nil, status.Errorf(codes.FailedPrecondition, "object %s/%s: %v", t.GetStore().GetBucket(), objectName, err)
		}
	}
	ttl := snap.Policy().ObjectTtl.AsDuration()
	obj := targets.NewObject(req.Key, req.Target, objectName, req.MediaType, req.Size, req.Sha256, req.Sha1, s.cfg.Now(), ttl)
	wctx, cancel := s.writeCtx(ctx)
	defer cancel()
	stored, err := s.reg.CompleteFill(wctx, obj, req.Token)
	if err != nil {
		s.metrics.fills.WithLabelValues("rejected").Inc()
		return nil, toStatus(err)
	}
	s.metrics.fills.WithLabelValues("ready").Inc()
	s.cfg.Log.Info("object ready", "key", req.Key, "target", req.Target, "size", req.Size)
	return &pb.ReportFillResponse{Object: stored}, nil
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
	if err := s.reg.AbortFill(wctx, req.Key, req.Token); err != nil {
		return nil, toStatus(err)
	}
	s.metrics.fills.WithLabelValues("aborted").Inc()
	s.cfg.Log.Info("fill aborted", "key", req.Key, "reason", req.Reason)
	return &pb.AbortFillResponse{}, nil
}

// WatchTargets sends the full target set, then again at every change of a target, its liveness
// or the policy.
func (s *Service) WatchTargets(req *pb.WatchTargetsRequest, stream pb.PlacementService_WatchTargetsServer) error {
	snap := s.readSnapshot(stream.Context())
	last := int64(-1)
	for {
		if snap.TargetsRevision != last {
			msg := &pb.WatchTargetsResponse{Revision: snap.Revision, RegionPreference: snap.Policy().RegionPreference}
			for _, t := range snap.Targets() {
				msg.Targets = append(msg.Targets, proto.Clone(t).(*pb.Target))
			}
			if err := stream.Send(msg); err != nil {
				return err
			}
			last = snap.TargetsRevision
		}
		select {
		case <-snap.Superseded():
			snap = s.w.Snapshot()
		case <-stream.Context().Done():
			return nil
		}
	}
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
