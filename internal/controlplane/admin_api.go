package controlplane

import (
	"context"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/targets"
)

// CreateTarget registers a target.
func (s *Service) CreateTarget(ctx context.Context, req *pb.CreateTargetRequest) (*pb.CreateTargetResponse, error) {
	wctx, cancel := s.writeCtx(ctx)
	defer cancel()
	t, err := s.reg.CreateTarget(wctx, req.GetTarget())
	if err != nil {
		return nil, toStatus(err)
	}
	s.settled(ctx, t.Revision)
	s.cfg.Log.Info("target created", "target", t.Name, "region", t.Region, "state", t.State.String())
	return &pb.CreateTargetResponse{Target: s.withHealth(t)}, nil
}

// UpdateTarget replaces a target with compare-and-swap on its revision.
func (s *Service) UpdateTarget(ctx context.Context, req *pb.UpdateTargetRequest) (*pb.UpdateTargetResponse, error) {
	wctx, cancel := s.writeCtx(ctx)
	defer cancel()
	t, err := s.reg.UpdateTarget(wctx, req.GetTarget())
	if err != nil {
		return nil, toStatus(err)
	}
	s.settled(ctx, t.Revision)
	s.cfg.Log.Info("target updated", "target", t.Name, "revision", t.Revision)
	return &pb.UpdateTargetResponse{Target: s.withHealth(t)}, nil
}

// SetTargetState drains, disables or re-activates a target.
func (s *Service) SetTargetState(ctx context.Context, req *pb.SetTargetStateRequest) (*pb.SetTargetStateResponse, error) {
	if err := targets.ValidateName("name", req.Name); err != nil {
		return nil, toStatus(err)
	}
	wctx, cancel := s.writeCtx(ctx)
	defer cancel()
	t, err := s.reg.SetState(wctx, req.Name, req.State)
	if err != nil {
		return nil, toStatus(err)
	}
	s.settled(ctx, t.Revision)
	s.cfg.Log.Info("target state changed", "target", t.Name, "state", t.State.String())
	return &pb.SetTargetStateResponse{Target: s.withHealth(t)}, nil
}

// DeleteTarget removes a target.
func (s *Service) DeleteTarget(ctx context.Context, req *pb.DeleteTargetRequest) (*pb.DeleteTargetResponse, error) {
	if err := targets.ValidateName("name", req.Name); err != nil {
		return nil, toStatus(err)
	}
	wctx, cancel := s.writeCtx(ctx)
	defer cancel()
	rev, err := s.reg.DeleteTarget(wctx, req.Name)
	if err != nil {
		return nil, toStatus(err)
	}
	s.settled(ctx, rev)
	s.cfg.Log.Info("target deleted", "target", req.Name)
	return &pb.DeleteTargetResponse{}, nil
}

func (s *Service) withHealth(t *pb.Target) *pb.Target {
	out := proto.Clone(t).(*pb.Target)
	out.Healthy = !t.Heartbeat
	if cur, ok := s.w.Snapshot().Target(t.Name); ok {
		out.Healthy = cur.Healthy
	}
	return out
}

// GetTarget reads a target from the snapshot; a draining one comes with its drain's progress.
func (s *Service) GetTarget(ctx context.Context, req *pb.GetTargetRequest) (*pb.GetTargetResponse, error) {
	if err := targets.ValidateName("name", req.Name); err != nil {
		return nil, toStatus(err)
	}
	snap := s.readSnapshot(ctx)
	t, ok := snap.Target(req.Name)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "target %q: not found", req.Name)
	}
	out := s.withWarnings(t)
	if t.State == pb.TargetState_TARGET_STATE_DRAINING {
		progress, _ := drainScan(snap, s.cfg.Now(), 0)
		out.Drain = progress[t.Name]
	}
	return &pb.GetTargetResponse{Target: out}, nil
}

// ListTargets lists every target from the snapshot, draining ones with their drain's progress.
// (Counting walks the index once, only when some target is draining.)
func (s *Service) ListTargets(ctx context.Context, _ *pb.ListTargetsRequest) (*pb.ListTargetsResponse, error) {
	snap := s.readSnapshot(ctx)
	progress, _ := drainScan(snap, s.cfg.Now(), 0)
	resp := &pb.ListTargetsResponse{Revision: snap.Revision}
	for _, t := range snap.Targets() {
		out := s.withWarnings(t)
		out.Drain = progress[t.Name]
		resp.Targets = append(resp.Targets, out)
	}
	return resp, nil
}

// GetPolicy returns the stored policy (revision 0 when none is stored).
func (s *Service) GetPolicy(ctx context.Context, _ *pb.GetPolicyRequest) (*pb.GetPolicyResponse, error) {
	return &pb.GetPolicyResponse{Policy: proto.Clone(s.readSnapshot(ctx).Policy()).(*pb.Policy)}, nil
}

// SetPolicy replaces the policy with compare-and-swap on its revision.
func (s *Service) SetPolicy(ctx context.Context, req *pb.SetPolicyRequest) (*pb.SetPolicyResponse, error) {
	wctx, cancel := s.writeCtx(ctx)
	defer cancel()
	p, err := s.reg.SetPolicy(wctx, req.GetPolicy())
	if err != nil {
		return nil, toStatus(err)
	}
	s.settled(ctx, p.Revision)
	s.cfg.Log.Info("policy set", "revision", p.Revision, "min_redirect_bytes", p.MinRedirectBytes,
		"region_preference", strings.Join(p.RegionPreference, ","), "forbid_cross_region_fills", p.ForbidCrossRegionFills,
		"cross_region_copies", !p.DisableCrossRegionCopies, "min_occurrences", p.MinOccurrences)
	return &pb.SetPolicyResponse{Policy: p}, nil
}

// ListObjects lists READY copies by target and/or key prefix, in key order, a page at a time. All
// copies of one key are on the same page; the page token is the last key listed.
func (s *Service) ListObjects(ctx context.Context, req *pb.ListObjectsRequest) (*pb.ListObjectsResponse, error) {
	size, err := targets.ValidatePageSize("page_size", req.PageSize)
	if err != nil {
		return nil, toStatus(err)
	}
	if err := targets.ValidateKeyPrefix("key_prefix", req.KeyPrefix); err != nil {
		return nil, toStatus(err)
	}
	if req.Target != "" {
		if err := targets.ValidateName("target", req.Target); err != nil {
			return nil, toStatus(err)
		}
	}
	if req.PageToken != "" {
		if err := targets.ValidateKey("page_token", req.PageToken); err != nil {
			return nil, toStatus(err)
		}
	}
	resp := &pb.ListObjectsResponse{}
	last := ""
	s.readSnapshot(ctx).RangeObjects(req.PageToken, func(k targets.Key, o *targets.Object) bool {
		key := k.String()
		if len(resp.Objects) >= size && key != last {
			resp.NextPageToken = last
			return false
		}
		if !strings.HasPrefix(key, req.KeyPrefix) || (req.Target != "" && o.Target() != req.Target) {
			return true
		}
		resp.Objects = append(resp.Objects, o.Proto(k))
		last = key
		return true
	})
	return resp, nil
}

// DeleteObjects purges every copy of a key: the records go at once (no redirect names them after
// the snapshot moves), and the stored bytes are queued for deletion by the janitor.
func (s *Service) DeleteObjects(ctx context.Context, req *pb.DeleteObjectsRequest) (*pb.DeleteObjectsResponse, error) {
	if err := targets.ValidateKey("key", req.Key); err != nil {
		return nil, toStatus(err)
	}
	wctx, cancel := s.writeCtx(ctx)
	defer cancel()
	n, rev, err := s.reg.DeleteObjects(wctx, req.Key, "purged", s.cfg.Now())
	if err != nil {
		return nil, toStatus(err)
	}
	s.settled(ctx, rev)
	s.cfg.Log.Info("objects purged", "key", req.Key, "copies", n)
	return &pb.DeleteObjectsResponse{Deleted: n}, nil
}
