package controlplane

import (
	"context"
	"math"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/targets"
)

// Copies the control plane makes itself, with the store's server-side copy (no bytes pass through
// Detour), verified like a fill and recorded READY under the key's fill claim:
//
//   - cross-region copies: every replica counts, in memory, the redirects it sends across regions
//     per (key, agent region). A pair that passes the policy's threshold within its window is
//     queued in etcd (copies/<region>/<key>, put-if-absent under a lease of the window), and the
//     elected janitor makes the copy into the region's target. Counts stay on the replica that
//     saw them and only the crossing is written, so the Place path never waits on etcd and etcd
//     takes one write per hot pair per window; the price is that with N replicas a key needs
//     between threshold and N·threshold redirects fleet-wide.
//   - drain migration: the janitor walks the index for copies at DRAINING targets whose key has no
//     copy at an ACTIVE target (sole copies) and copies each to placement.Home for the draining
//     target's region. Until that copy is READY the draining target keeps serving its own.
//
// The janitor starts at most JanitorConfig.CopyRate copies a second, interleaving the two kinds
// (copier.go). This file is the Service's half: counting and asking.

// hotShards spreads the counters' locks; Place takes one only on a cross-region redirect.
const hotShards = 16

// hotKeys counts cross-region redirects per (key, agent region) in a window that starts at the
// pair's first counted redirect, in bounded memory: when a shard is full it drops the pairs whose
// window is over (at most a few times per window), and while it is still full new pairs are not
// counted (the hot ones are already in it).
type hotKeys struct {
	limit  int // pairs per shard
	shards [hotShards]hotShard
}

type hotShard struct {
	mu        sync.Mutex
	counts    map[hotPair]hotCount
	lastPrune int64
}

type hotPair struct {
	key    targets.Key
	region string
}

type hotCount struct {
	since int64 // unix ns of the window's first redirect
	n     uint32
}

func newHotKeys(limit int) *hotKeys {
	return &hotKeys{limit: max(1, limit/hotShards)}
}

// count records one cross-region redirect of key to an agent in region. It returns the pair's
// count in its window and whether this redirect took it past the threshold (true once a window).
func (h *hotKeys) count(key targets.Key, region string, now time.Time, c copySettings) (uint32, bool) {
	sh := &h.shards[int(key[len(key)-1])%hotShards]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	p, ns, window := hotPair{key: key, region: region}, now.UnixNano(), int64(c.window)
	e, ok := sh.counts[p]
	if ok && ns-e.since >= window {
		ok = false
	}
	if !ok {
		if sh.counts == nil {
			sh.counts = map[hotPair]hotCount{}
		}
		if _, present := sh.counts[p]; !present && len(sh.counts) >= h.limit {
			if ns-sh.lastPrune < window/8 {
				return 0, false
			}
			sh.lastPrune = ns
			for q, x := range sh.counts {
				if ns-x.since >= window {
					delete(sh.counts, q)
				}
			}
			if len(sh.counts) >= h.limit {
				return 0, false
			}
		}
		e = hotCount{since: ns}
	}
	if e.n < math.MaxUint32 {
		e.n++
	}
	sh.counts[p] = e
	return e.n, e.n == c.threshold+1
}

// size is the number of pairs counted (tests).
func (h *hotKeys) size() int {
	n := 0
	for i := range h.shards {
		h.shards[i].mu.Lock()
		n += len(h.shards[i].counts)
		h.shards[i].mu.Unlock()
	}
	return n
}

// maxPendingCopies bounds the copy requests a replica holds between flushes.
const maxPendingCopies = 10000

// pendingCopies are copy requests waiting for flushCopyRequests.
type pendingCopies struct {
	mu sync.Mutex
	m  map[hotPair]*pb.CopyRequest
}

func (p *pendingCopies) add(key targets.Key, region string, n uint32, now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m == nil {
		p.m = map[hotPair]*pb.CopyRequest{}
	}
	if len(p.m) >= maxPendingCopies {
		return false
	}
	p.m[hotPair{key: key, region: region}] = &pb.CopyRequest{Key: key.String(), Region: region, Redirects: n,
		Requested: timestamppb.New(now)}
	return true
}

func (p *pendingCopies) take() []*pb.CopyRequest {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*pb.CopyRequest, 0, len(p.m))
	for _, q := range p.m {
		out = append(out, q)
	}
	p.m = nil
	return out
}

// countRedirect counts a redirect by locality and, for a cross-region one to an agent whose region
// has a store, towards a copy in that region.
func (s *Service) countRedirect(v *view, key targets.Key, region, target string, now time.Time) {
	switch {
	case region == "":
		s.metrics.redirects.WithLabelValues("unknown_region").Inc()
		return
	case v.targets[target].Region == region:
		s.metrics.redirects.WithLabelValues("in_region").Inc()
		return
	}
	s.metrics.redirects.WithLabelValues("cross_region").Inc()
	// Only regions with an active target (registered, so validated) are counted: nothing else
	// could take a copy, and the agent's region string reaches etcd keys only this way.
	if v.copies.off || !v.stored[region] {
		return
	}
	if n, crossed := s.hot.count(key, region, now, v.copies); crossed {
		outcome := "pending"
		if !s.copyRequests.add(key, region, n, now) {
			outcome = "dropped"
		}
		s.metrics.copyRequests.WithLabelValues(outcome).Inc()
	}
}

// flushCopyRequests queues this replica's pending copy requests in etcd (Run does it every
// CopyInterval). Every replica does it for the redirects it answered.
func (s *Service) flushCopyRequests(ctx context.Context) {
	pending := s.copyRequests.take()
	if len(pending) == 0 {
		return
	}
	ttl := s.viewOf(s.w.Snapshot()).copies.window
	for _, q := range pending {
		wctx, cancel := s.writeCtx(ctx)
		queued, err := s.reg.QueueCopy(wctx, q, ttl)
		cancel()
		switch {
		case err != nil:
			// The pair counts again in its next window.
			s.metrics.copyRequests.WithLabelValues("failed").Inc()
			s.once.Warn("copy-requests", "cannot queue cross-region copy requests", "err", err)
			return
		case queued:
			s.metrics.copyRequests.WithLabelValues("queued").Inc()
		default:
			s.metrics.copyRequests.WithLabelValues("already_queued").Inc()
		}
	}
	s.once.Forget("copy-requests")
}
