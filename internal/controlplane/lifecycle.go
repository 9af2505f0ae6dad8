package controlplane

import (
	"context"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/targets"
)

// DefaultObjectTTL is how long a READY object is kept after it was stored or last extended, when
// the policy sets no object_ttl.
const DefaultObjectTTL = 30 * 24 * time.Hour

func objectTTL(p *pb.Policy) time.Duration { return policyDuration(p.GetObjectTtl(), DefaultObjectTTL) }

// DefaultTransientObjectTTL is the TTL of transient objects (StoredObject.transient: answers their
// agent expects to be superseded soon, such as a growing repository's newest, partial batch) when
// the policy sets no transient_object_ttl. Such an object is asked for by every clone until the
// next push re-keys it, and then by nobody: a day keeps it for a repository cloned at least daily
// (each use within the last three quarters of its TTL extends it by another day), and bounds what
// superseded ones hold to about a day's pushes. Dropping one too early costs a re-fill of a batch,
// a small share of a clone (bench/RESULTS.md, issue 17).
const DefaultTransientObjectTTL = 24 * time.Hour

// ttlOf is the TTL of an object of a lifetime class: transient_object_ttl for transient objects,
// bounded by object_ttl, which is every other object's.
func ttlOf(p *pb.Policy, transient bool) time.Duration {
	if transient {
		return min(policyDuration(p.GetTransientObjectTtl(), DefaultTransientObjectTTL), objectTTL(p))
	}
	return objectTTL(p)
}

// maxPendingExtensions bounds the extensions a replica keeps between flushes; past it, objects
// wait for the next flush (they are still far from expiry: see extender.used).
const maxPendingExtensions = 100000

// extender moves the expiry of objects that are being redirected to, without a write per
// redirect: an object is queued only once less than three quarters of its TTL remain, and the
// queue is written in batches. So an object is extended at most about once per quarter of its TTL
// however hot it is, and an object nobody asks for expires. An extension keeps the object's lifetime
// class: a transient object is extended by the transient TTL, never promoted to the object TTL.
type extender struct {
	mu      sync.Mutex
	pending map[extension]struct{}
}

type extension struct {
	key    targets.Key
	target string
	obj    targets.Object
}

func (e *extender) used(key targets.Key, obj *targets.Object, now time.Time, ttl time.Duration) {
	if obj.Expires == 0 || time.Unix(0, obj.Expires).Sub(now) > ttl*3/4 {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.pending == nil {
		e.pending = map[extension]struct{}{}
	}
	if len(e.pending) < maxPendingExtensions {
		e.pending[extension{key: key, target: obj.Target(), obj: *obj}] = struct{}{}
	}
}

func (e *extender) take() []extension {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]extension, 0, len(e.pending))
	for x := range e.pending {
		out = append(out, x)
	}
	e.pending = nil
	return out
}

// flushExtensions writes the queued extensions (Run does it every ExtendInterval). Every replica
// does it for the redirects it answered; writes compare the record's revision, so replicas never
// undo each other or a newer fill.
func (s *Service) flushExtensions(ctx context.Context) {
	pending := s.extender.take()
	if len(pending) == 0 {
		return
	}
	now := s.cfg.Now()
	policy := s.w.Snapshot().Policy()
	xs := make([]targets.Extension, len(pending))
	for i, p := range pending {
		o := p.obj.Proto(p.key) // with its lifetime class
		o.Expires = timestamppb.New(now.Add(ttlOf(policy, p.obj.Transient)))
		xs[i] = targets.Extension{Object: o, ModRevision: p.obj.ModRevision}
	}
	wctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout*4)
	defer cancel()
	n, err := s.reg.Extend(wctx, xs)
	s.metrics.extended.Add(float64(n))
	if err != nil {
		s.once.Warn("extend", "cannot extend the expiry of used objects; retrying at the next use", "err", err)
		return
	}
	s.once.Forget("extend")
}
