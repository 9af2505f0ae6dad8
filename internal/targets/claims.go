package targets

import (
	"context"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// maxClaimsPerTxn keeps a grouped claim transaction under etcd's default limit of 128 operations
// (each claim is one nested transaction).
const maxClaimsPerTxn = 64

// claimGroup writes concurrent fill claims together (group commit): while inFlight transactions
// are under way, arriving claims wait and are then written in one transaction. No claim waits
// for a timer: at low load each goes alone at once, under load they share. Each claim is a
// nested transaction with its own compare, so one key's claim failing fails no other.
type claimGroup struct {
	r        *Registry
	inFlight int

	mu      sync.Mutex
	pending []*pendingClaim
	running int // transactions under way
}

type pendingClaim struct {
	ctx   context.Context
	c     *pb.FillClaim
	ttl   time.Duration
	lease clientv3.LeaseID
	done  chan claimResult // buffered: the writer never blocks on it
	// dupOf is the claim of the same key earlier in the same transaction: this one has its answer.
	dupOf *pendingClaim
}

type claimResult struct {
	granted bool
	err     error
}

// GroupClaims makes concurrent Claims share etcd transactions: at most inFlight claim
// transactions at a time, the claims that arrive meanwhile written together in the next (at most
// 64 to one). 0 (the default): every claim is a transaction of its own. Call it before the first
// Claim.
func (r *Registry) GroupClaims(inFlight int) {
	r.claims = nil
	if inFlight > 0 {
		r.claims = &claimGroup{r: r, inFlight: inFlight}
	}
}

// claim queues one claim and waits for its transaction. The transaction's deadline is the
// earliest of its claims' deadlines, so no claim waits past its own.
func (g *claimGroup) claim(ctx context.Context, c *pb.FillClaim, ttl time.Duration, lease clientv3.LeaseID) (bool, error) {
	p := &pendingClaim{ctx: ctx, c: c, ttl: ttl, lease: lease, done: make(chan claimResult, 1)}
	g.mu.Lock()
	g.pending = append(g.pending, p)
	var batch []*pendingClaim
	if g.running < g.inFlight {
		batch = g.take()
		g.running++
	}
	g.mu.Unlock()
	if batch != nil {
		// The writer lives while claims wait: it ends when it finds none.
		go g.write(batch)
	}
	res := <-p.done
	return res.granted, res.err
}

// take removes the next batch from pending; g.mu is held.
func (g *claimGroup) take() []*pendingClaim {
	n := min(len(g.pending), maxClaimsPerTxn)
	if n == 0 {
		return nil
	}
	batch := make([]*pendingClaim, n)
	copy(batch, g.pending)
	g.pending = append(g.pending[:0], g.pending[n:]...)
	return batch
}

func (g *claimGroup) write(batch []*pendingClaim) {
	for batch != nil {
		g.commit(batch)
		g.mu.Lock()
		if batch = g.take(); batch == nil {
			g.running--
		}
		g.mu.Unlock()
	}
}

// commit writes batch in one transaction of nested per-key transactions and answers each claim.
func (g *claimGroup) commit(batch []*pendingClaim) {
	var ops []clientv3.Op
	var sent []*pendingClaim
	first := map[string]*pendingClaim{}
	var deadline time.Time
	for _, p := range batch {
		if err := p.ctx.Err(); err != nil {
			// Gave up while it waited: nothing was written for it.
			p.done <- claimResult{err: fmt.Errorf("claim %s: %w", p.c.Key, err)}
			continue
		}
		if f, dup := first[p.c.Key]; dup {
			p.dupOf = f // answered with the first claim of its key, below
			continue
		}
		first[p.c.Key] = p
		if dl, ok := p.ctx.Deadline(); ok && (deadline.IsZero() || dl.Before(deadline)) {
			deadline = dl
		}
		fk := g.r.fillKey(p.c.Key)
		ops = append(ops, clientv3.OpTxn(
			[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(fk), "=", 0)},
			[]clientv3.Op{clientv3.OpPut(fk, marshal(p.c), clientv3.WithLease(p.lease))}, nil))
		sent = append(sent, p)
	}
	if len(sent) == 0 {
		return
	}
	ctx, cancel := context.Background(), context.CancelFunc(func() {})
	if !deadline.IsZero() {
		ctx, cancel = context.WithDeadline(ctx, deadline)
	}
	defer cancel()
	resp, err := g.r.cli.Txn(ctx).Then(ops...).Commit()
	result := map[string]claimResult{}
	for i, p := range sent {
		switch {
		case err != nil:
			g.r.forgetLease(p.ttl, p.lease)
			result[p.c.Key] = claimResult{err: fmt.Errorf("claim %s: %w", p.c.Key, outcomeUnknown(err))}
		case i >= len(resp.Responses) || resp.Responses[i].GetResponseTxn() == nil:
			result[p.c.Key] = claimResult{err: fmt.Errorf("claim %s: etcd answered %d of %d grouped claims", p.c.Key, len(resp.Responses), len(sent))}
		default:
			result[p.c.Key] = claimResult{granted: resp.Responses[i].GetResponseTxn().Succeeded}
		}
	}
	for _, p := range batch {
		switch res, sentOrDup := result[p.c.Key]; {
		case p.dupOf != nil && res.err == nil:
			p.done <- claimResult{granted: false} // the other claim of its key went first
		case p.dupOf != nil || (sentOrDup && first[p.c.Key] == p):
			p.done <- res
		}
	}
}
