package targets

import (
	"context"
	"fmt"
	"net/url"
	"sort"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Agent records are the fleet view: each agent's latest report, kept under a lease so that an
// agent that stops reporting disappears on its own. They are not part of the target set: writing
// one leaves TargetsRevision alone.

func (r *Registry) agentKey(id string) string { return r.prefix + "agents/" + url.PathEscape(id) }

// PutAgent records a under its id for at least ttl (at most ttl·5/4: records share leases like
// claims) and returns the write's revision. The record is the agent's own, replaced whole at
// every report, so no compare is needed.
func (r *Registry) PutAgent(ctx context.Context, a *pb.Agent, ttl time.Duration) (int64, error) {
	if a.Id == "" {
		return 0, invalid("id", "is required")
	}
	lease, err := r.claimLease(ctx, ttl)
	if err != nil {
		return 0, fmt.Errorf("register agent %q: grant lease: %w", a.Id, err)
	}
	stored := proto.Clone(a).(*pb.Agent)
	stored.BehindFor, stored.Lagging = nil, false
	resp, err := r.cli.Put(ctx, r.agentKey(a.Id), marshal(stored), clientv3.WithLease(lease))
	if err != nil {
		r.forgetLease(ttl, lease)
		return 0, fmt.Errorf("register agent %q: %w", a.Id, outcomeUnknown(err))
	}
	return resp.Header.Revision, nil
}

// Agents returns the registered agents sorted by id (do not modify them).
func (s *Snapshot) Agents() []*pb.Agent {
	out := make([]*pb.Agent, 0, len(s.agents))
	for _, a := range s.agents {
		out = append(out, a)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Id < out[j].Id })
	return out
}

// isAgentKey reports whether rest (a key below the prefix) is an agent record's.
func isAgentKey(rest string) bool { return strings.HasPrefix(rest, "agents/") }

// applyAgent records one agent event in snap (whose agents map the caller has already copied).
func (w *Watcher) applyAgent(snap *Snapshot, del bool, rest string, value []byte) {
	id, err := url.PathUnescape(strings.TrimPrefix(rest, "agents/"))
	if err != nil {
		w.log.Error("skipping agent record with a malformed key", "key", rest)
		return
	}
	if del {
		delete(snap.agents, id)
		return
	}
	a := &pb.Agent{}
	if err := proto.Unmarshal(value, a); err != nil || a.Id != id {
		w.log.Error("skipping undecodable agent record", "key", rest, "err", err)
		return
	}
	snap.agents[id] = a
}
