package agent

import (
	"context"
	"sort"
	"time"

	"github.com/cenkalti/backoff/v5"
	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"google.golang.org/grpc"
)

// watchTargets follows the control plane's target set until ctx ends and keeps the target set
// the agent advertises and the location cache's invalidations. A broken stream is reopened as soon as a connection is ready
// (the call waits for one), with a short backoff between attempts that fail at once.
func (a *Agent) watchTargets(ctx context.Context) {
	retry := backoff.NewExponentialBackOff()
	retry.InitialInterval, retry.MaxInterval = 50*time.Millisecond, time.Second
	for ctx.Err() == nil {
		// Resume from the last message applied: when nothing changed but invalidations, the
		// cached redirects survive a reconnection.
		stream, err := a.placement.WatchTargets(ctx, &pb.WatchTargetsRequest{AgentRegion: a.cfg.Region,
			ResumeRevision: a.appliedRevision.Load()}, grpc.WaitForReady(true))
		if err == nil {
			for {
				msg, rerr := stream.Recv()
				if rerr != nil {
					err = rerr
					break
				}
				a.cache.apply(msg)
				a.appliedTargetSet(msg)
				if msg.InvalidationsOnly {
					continue
				}
				ts := orderTargets(msg, a.cfg.Region)
				a.targets.Store(ts)
				a.setPublicTargets(ts)
				a.metrics.targetsRevision.Set(float64(msg.Revision))
				a.once.Recovered("watch", "target watch restored", "revision", msg.Revision)
				retry.Reset()
			}
		}
		// Invalidations would be missed from now on.
		a.cache.lost()
		if ctx.Err() != nil {
			return
		}
		// The last known target set stays advertised: stale targets are safer than none, since
		// clients with no targets simply fetch inline and Place refuses unknown targets anyway.
		wait := retry.NextBackOff()
		a.once.Warn("watch", "target watch failed; reopening as soon as a control plane is ready", "err", err)
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return
		}
	}
}

// TargetSet is what the agent advertises: the healthy targets that may serve (ACTIVE, and
// DRAINING ones, which keep serving the copies no other target has yet), in the order placement
// prefers for an agent in its region:
//
//  1. active targets, then draining ones (placement redirects to a draining target only when no
//     other copy exists, so it goes last);
//  2. the agent's own region, then the regions of the policy's preference in its order, then the
//     rest;
//  3. heavier first, then by name.
//
// Disabled and unhealthy targets are not in it. A TargetSet is immutable; a new one replaces it at
// every change the control plane sends.
type TargetSet struct {
	Revision int64
	Live     []*pb.Target
	names    []string
}

// Names are the live targets' names in order (shared: do not modify).
func (ts *TargetSet) Names() []string { return ts.names }

// Targets is the target set the agent advertises now (nil before the first arrived).
func (a *Agent) Targets() *TargetSet { return a.targets.Load() }

// orderTargets builds the target set of a WatchTargets message for an agent in region.
func orderTargets(msg *pb.WatchTargetsResponse, region string) *TargetSet {
	pref := map[string]int{region: -1}
	for i, r := range msg.RegionPreference {
		if _, ok := pref[r]; !ok {
			pref[r] = i
		}
	}
	regionRank := func(t *pb.Target) int {
		if p, ok := pref[t.Region]; ok {
			return p
		}
		return len(msg.RegionPreference)
	}
	draining := func(t *pb.Target) bool { return t.State == pb.TargetState_TARGET_STATE_DRAINING }
	var live []*pb.Target
	for _, t := range msg.Targets {
		if t.Healthy && (t.State == pb.TargetState_TARGET_STATE_ACTIVE || draining(t)) {
			live = append(live, t)
		}
	}
	sort.SliceStable(live, func(i, j int) bool {
		a, b := live[i], live[j]
		if da, db := draining(a), draining(b); da != db {
			return !da
		}
		if ra, rb := regionRank(a), regionRank(b); ra != rb {
			return ra < rb
		}
		if a.Weight != b.Weight {
			return a.Weight > b.Weight
		}
		return a.Name < b.Name
	})
	ts := &TargetSet{Revision: msg.Revision, Live: live, names: make([]string, len(live))}
	for i, t := range live {
		ts.names[i] = t.Name
	}
	return ts
}
