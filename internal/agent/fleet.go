package agent

import (
	"context"
	"runtime/debug"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// register keeps this agent in the control plane's fleet view until ctx ends: a report every
// RegisterInterval, and one as soon as a new target set is applied, so the view shows it at once
// (lag is judged by the applied revision). The record lives three intervals without a report.
func (a *Agent) register(ctx context.Context) {
	t := time.NewTicker(a.cfg.RegisterInterval)
	defer t.Stop()
	for {
		a.registerOnce(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.applied:
		}
	}
}

func (a *Agent) registerOnce(ctx context.Context) {
	req := &pb.RegisterAgentRequest{Name: a.cfg.AgentID, Region: a.cfg.Region, Version: a.cfg.Version,
		AppliedRevision: a.appliedRevision.Load(), LocationCacheEntries: int64(a.cache.len()),
		Ttl: durationpb.New(3 * a.cfg.RegisterInterval)}
	store, origin, filled := a.OffloadBytes()
	req.StoreBytes, req.OriginBytes, req.FilledBytes = uint64(store), uint64(origin), uint64(filled)
	if ns := a.lastPlace.Load(); ns != 0 {
		req.LastPlace = timestamppb.New(time.Unix(0, ns))
	}
	ctx, cancel := context.WithTimeout(ctx, a.cfg.RegisterInterval)
	defer cancel()
	if _, err := a.placement.RegisterAgent(ctx, req); err != nil {
		if a.bg.Err() == nil {
			a.once.Warn("register", "cannot register in the control plane's fleet view; retrying", "err", err)
		}
		return
	}
	a.once.Recovered("register", "registered in the control plane's fleet view")
}

// appliedTargetSet notes a WatchTargets message applied, and asks for a report when it carried a
// target set.
func (a *Agent) appliedTargetSet(msg *pb.WatchTargetsResponse) {
	a.appliedRevision.Store(msg.Revision)
	if msg.InvalidationsOnly {
		return
	}
	select {
	case a.applied <- struct{}{}:
	default:
	}
}

// buildVersion is the main module's version, or its VCS revision in a development build.
func buildVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && (v == "" || v == "(devel)") && len(s.Value) >= 12 {
			v = "devel-" + s.Value[:12]
		}
	}
	if v == "" {
		v = "(devel)"
	}
	return v
}
