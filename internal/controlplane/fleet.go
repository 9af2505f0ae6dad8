package controlplane

import (
	"context"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Defaults and bounds of agent registrations.
const (
	DefaultAgentTTL          = 30 * time.Second
	DefaultAgentLagThreshold = 30 * time.Second
	minAgentTTL, maxAgentTTL = 2 * time.Second, 10 * time.Minute
)

// RegisterAgent records the calling agent in the fleet view under its certificate's identity (on
// a plaintext control plane, under the id or else the name it gives): an agent cannot speak for
// another.
func (s *Service) RegisterAgent(ctx context.Context, req *pb.RegisterAgentRequest) (*pb.RegisterAgentResponse, error) {
	id := callerID(ctx)
	switch {
	case id == "" && req.Id == "" && req.Name == "":
		return nil, invalidArg("id", "is required on a control plane without client certificates")
	case id == "" && req.Id == "":
		id = req.Name
	case id == "":
		id = req.Id
	case req.Id != "" && req.Id != id:
		s.metrics.rejections.WithLabelValues("foreign_agent_id").Inc()
		s.cfg.Log.Warn("agent tried to register under another identity", "agent", id, "claimed", req.Id)
		return nil, status.Errorf(codes.PermissionDenied, "id %q is not the caller's certificate identity %q", req.Id, id)
	}
	for _, f := range []struct{ name, v string }{{"id", id}, {"name", req.Name}, {"region", req.Region}, {"version", req.Version}} {
		if len(f.v) > 512 {
			return nil, invalidArg(f.name, "is longer than 512 bytes")
		}
	}
	ttl := DefaultAgentTTL
	if req.Ttl != nil {
		ttl = req.Ttl.AsDuration()
	}
	if ttl < minAgentTTL || ttl > maxAgentTTL {
		return nil, invalidArg("ttl", "%s is not between %s and %s", ttl, minAgentTTL, maxAgentTTL)
	}
	a := &pb.Agent{Id: id, Name: req.Name, Region: req.Region, Version: req.Version, AppliedRevision: req.AppliedRevision,
		LastPlace: req.LastPlace, LocationCacheEntries: req.LocationCacheEntries, Refreshed: timestamppb.New(s.cfg.Now()),
		StoreBytes: req.StoreBytes, OriginBytes: req.OriginBytes, FilledBytes: req.FilledBytes}
	wctx, cancel := s.writeCtx(ctx)
	defer cancel()
	rev, err := s.reg.PutAgent(wctx, a, ttl)
	if err != nil {
		return nil, toStatus(err)
	}
	s.wrote(rev)
	return &pb.RegisterAgentResponse{Id: id, Ttl: durationpb.New(ttl)}, nil
}

// ListAgents lists the registered agents; one whose applied revision has been behind this
// replica's target set for longer than the lag threshold is flagged lagging.
func (s *Service) ListAgents(ctx context.Context, _ *pb.ListAgentsRequest) (*pb.ListAgentsResponse, error) {
	snap := s.readSnapshot(ctx)
	now := s.cfg.Now()
	resp := &pb.ListAgentsResponse{TargetsRevision: snap.TargetsRevision, LagThreshold: durationpb.New(s.cfg.AgentLagThreshold)}
	for _, a := range snap.Agents() {
		out := proto.Clone(a).(*pb.Agent)
		if d, behind := s.fleet.behind(a.AppliedRevision, now); behind {
			out.BehindFor, out.Lagging = durationpb.New(d), d > s.cfg.AgentLagThreshold
		}
		resp.Agents = append(resp.Agents, out)
	}
	return resp, nil
}

// lagging counts the registered agents ListAgents would flag.
func (s *Service) lagging() int {
	now := s.cfg.Now()
	n := 0
	for _, a := range s.w.Snapshot().Agents() {
		if d, behind := s.fleet.behind(a.AppliedRevision, now); behind && d > s.cfg.AgentLagThreshold {
			n++
		}
	}
	return n
}

func (s *Service) registerFleetMetrics() {
	s.metrics.Registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_agents_registered", Help: "Agents registered in the fleet view."},
			func() float64 { return float64(len(s.w.Snapshot().Agents())) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_agents_lagging",
			Help: "Registered agents whose applied target set has been behind this replica's for longer than --agent-lag-threshold."},
			func() float64 { return float64(s.lagging()) }))
}

// runFleetClock notes when this replica sees the target set change, until ctx ends.
func (s *Service) runFleetClock(ctx context.Context) {
	select {
	case <-s.w.Ready():
	case <-ctx.Done():
		return
	}
	snap := s.w.Snapshot()
	last := snap.TargetsRevision
	for {
		select {
		case <-snap.Superseded():
			snap = s.w.Snapshot()
			if snap.TargetsRevision != last {
				s.fleet.saw(snap.TargetsRevision, s.cfg.Now())
				last = snap.TargetsRevision
			}
		case <-ctx.Done():
			return
		}
	}
}

// targetSetClock remembers when this replica saw the target set change, so that an agent's
// applied revision tells how long it has been behind: since the first change after it. The
// target set this replica loaded at start does not count, since when it came about is unknown
// (and every replica loads at a revision of its own, which agents of other replicas never see);
// an agent is judged only on changes this replica watched happen.
type targetSetClock struct {
	mu      sync.Mutex
	changes []targetSetChange // oldest first, at most maxChanges
}

type targetSetChange struct {
	rev int64
	at  time.Time
}

const maxChanges = 1024

func (c *targetSetClock) saw(rev int64, at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.changes) == maxChanges {
		c.changes = append(c.changes[:0], c.changes[1:]...)
	}
	c.changes = append(c.changes, targetSetChange{rev: rev, at: at})
}

// behind reports how long an agent that applied revision applied has missed a change (false:
// it has seen every change this replica watched).
func (c *targetSetClock) behind(applied int64, now time.Time) (time.Duration, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, ch := range c.changes {
		if ch.rev > applied {
			return max(now.Sub(ch.at), 0), true
		}
	}
	return 0, false
}
