package controlplane

import (
	"context"
	"fmt"
	"slices"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/placement"
	"github.com/detourhq/detour/internal/targets"
)

// Explain answers a placement question the way Place would from the current snapshot, and shows
// how: every copy of the key and every accepted target with what placement made of it. It writes
// nothing (no fill claim, no cross-region count), so an operator can ask as often as they like.
func (s *Service) Explain(ctx context.Context, req *pb.ExplainRequest) (*pb.ExplainResponse, error) {
	if err := targets.ValidateKey("key", req.Key); err != nil {
		return nil, toStatus(err)
	}
	key, _ := targets.ParseKey(req.Key)
	snap := s.readSnapshot(ctx)
	v := s.viewOf(snap)
	accepted := req.AcceptedTargets
	if len(accepted) == 0 {
		for _, t := range snap.Targets() {
			accepted = append(accepted, t.Name)
		}
	}
	all := snap.Copies(key)
	objs := servable(snap, all)
	copies := make([]placement.Copy, len(objs))
	for i, o := range objs {
		copies[i] = placement.Copy{Target: o.Target(), Size: o.Size, Expires: o.ExpiresAt()}
	}
	d, tr := placement.Explain(v.targets, copies, v.policy, placement.Request{Key: req.Key, Accepted: accepted,
		Region: req.AgentRegion, SizeHint: req.SizeHint, Now: s.cfg.Now()})
	resp := &pb.ExplainResponse{Result: pb.PlaceResult_PLACE_RESULT_INLINE, Reason: string(d.Reason), SnapshotRevision: snap.Revision,
		Steps: tr.Steps, AcceptedTargets: accepted}
	for i := range all {
		if o := &all[i]; !slices.Contains(objs, o) {
			// Never a candidate: the record is not where its target keeps objects now.
			resp.Copies = append(resp.Copies, &pb.ExplainedCopy{Target: o.Target(), Size: o.Size, Expires: expiresOf(o),
				Dropped: "not servable: its target was recreated or its store moved since it was stored"})
			resp.Steps = append(resp.Steps, fmt.Sprintf("  copy at %s not servable: its target was recreated or its store moved", o.Target()))
		}
	}
	for i, c := range tr.Copies {
		resp.Copies = append(resp.Copies, &pb.ExplainedCopy{Target: c.Copy.Target, Region: c.Region, Size: c.Copy.Size,
			Expires: expiresOf(objs[i]), Kept: c.Kept, Dropped: c.Dropped, Rank: int32(c.Rank), Draining: c.Draining,
			Remote: c.Remote, RegionPreference: int32(c.Preference), Score: c.Score})
	}
	for _, t := range tr.Targets {
		resp.Targets = append(resp.Targets, &pb.ExplainedTarget{Target: t.Name, Region: t.Region, Kept: t.Kept, Dropped: t.Dropped,
			Score: t.Score, RegionOrder: int32(t.RegionOrder)})
	}
	if c, held := snap.Claim(req.Key); held {
		resp.Claim = proto.Clone(c).(*pb.FillClaim)
	}
	switch {
	case d.Result == placement.Redirect:
		resp.Result, resp.Target = pb.PlaceResult_PLACE_RESULT_REDIRECT, d.Copy.Target
		if t := v.targets[d.Copy.Target]; !v.copies.off && t.Region != req.AgentRegion && v.stored[req.AgentRegion] {
			resp.CrossRegionRedirects, resp.CrossRegionCopyThreshold = s.hot.peek(key, req.AgentRegion, s.cfg.Now(), v.copies), v.copies.threshold
			resp.Steps = append(resp.Steps, fmt.Sprintf("a cross-region redirect: %d counted by this replica in the window; past %d the key gets a copy in region %s",
				resp.CrossRegionRedirects, resp.CrossRegionCopyThreshold, req.AgentRegion))
		}
	case d.Fill != "" && s.cfg.Store == nil:
		resp.Reason = "no_store_access"
		resp.Steps = append(resp.Steps, "this control plane has no store access: it grants no fills")
	case d.Fill != "" && resp.Claim != nil:
		resp.Reason = string(placement.ReasonFillInProgress)
		resp.Steps = append(resp.Steps, fmt.Sprintf("a fill of this key at %s is in progress (claim held by %s): no second fill",
			resp.Claim.Target, resp.Claim.Holder))
	case d.Fill != "":
		resp.FillTarget = d.Fill
		if a := v.admission; a.minOccurrences > 1 {
			resp.MinOccurrences = a.minOccurrences
			resp.AdmissionCount = s.misses.Peek(req.Key, s.cfg.Now(), a.window)
			if resp.AdmissionCount+1 < a.minOccurrences {
				resp.FillTarget, resp.Reason = "", ReasonNotAdmitted
				resp.Steps = append(resp.Steps, fmt.Sprintf("not admitted yet: %d misses counted by this replica, a fill is granted on miss %d (policy min_occurrences)",
					resp.AdmissionCount, a.minOccurrences))
			} else {
				resp.Steps = append(resp.Steps, fmt.Sprintf("admitted: %d misses counted by this replica; the next one reaches min_occurrences %d",
					resp.AdmissionCount, a.minOccurrences))
			}
		}
	}
	return resp, nil
}

func expiresOf(o *targets.Object) *timestamppb.Timestamp {
	if o.Expires == 0 {
		return nil
	}
	return timestamppb.New(o.ExpiresAt())
}

// peek is the pair's count in its current window, without counting.
func (h *hotKeys) peek(key targets.Key, region string, now time.Time, c copySettings) uint32 {
	sh := &h.shards[int(key[len(key)-1])%hotShards]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	e, ok := sh.counts[hotPair{key: key, region: region}]
	if !ok || now.UnixNano()-e.since >= int64(c.window) {
		return 0
	}
	return e.n
}
