package controlplane

import (
	"context"
	"errors"
	"sync"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/placement"
	"github.com/detourhq/detour/internal/targets"
)

// A fill claim is written to etcd within the claim timeout (1s by default), but a Place waits for
// it only half of its caller's deadline (an agent's 50ms by default). Before, the write itself
// was cut at that point: on an etcd whose commits take longer than 25ms (a busy disk, a distant
// leader) no claim was ever written, no fill ever granted, and every request went to the origin.
// Now the write goes on after the caller is answered (claim_pending), and a claim it wins is
// parked for the same agent's next Place of the key, which is handed it without another write.
// A parked claim nobody comes back for is released after parkFor (a quarter of the claim's TTL
// at most), and so are those a replica holds when it stops.
//
// Parked claims live in the replica that wrote them: with several replicas, an agent's next Place
// reaches that one only some of the time (the others answer fill_in_progress, as for any held
// claim), so on a slow etcd a fill may take a few requests, or a release and a new claim, to
// start. Handing a claim over on any replica would need to know that its grant never reached the
// agent, which only the replica that answered knows.

const (
	// claimsInFlight bounds the claim writes under way (those whose caller was answered
	// included); past it a Place is answered claim_failed without writing. It also bounds what a
	// frozen etcd piles up before the first write times out and the breaker opens.
	claimsInFlight = 256
	// maxParked bounds the claims parked; past it a late grant is released at once.
	maxParked = 4096
	// parkFor is how long a late grant waits for its agent's next Place of the key (at most a
	// quarter of the claim's TTL). A key asked for once in a while is not worth holding every
	// other agent's fill for.
	parkFor = 5 * time.Second
)

// claimResult is the outcome of a claim's write.
type claimResult struct {
	granted bool
	err     error
}

// Why a Place stopped waiting for its claim's write.
const (
	leftCancelled = iota + 1 // the caller went away: a claim won is of no use
	leftWaiting              // the caller was answered claim_pending: a claim won is parked
)

// claimCall is one claim's write, shared by the Place that started it and the goroutine that
// writes it; whichever finishes second settles the outcome.
type claimCall struct {
	result chan claimResult // receives the outcome if the Place is still waiting
	mu     sync.Mutex
	done   bool // the outcome is known (sent on result)
	left   int  // the Place stopped waiting (leftCancelled, leftWaiting)
}

// leave records that the Place stops waiting for why. If the outcome has come meanwhile it is
// returned (ok) and the Place uses it.
func (c *claimCall) leave(why int) (claimResult, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return <-c.result, true
	}
	c.left = why
	return claimResult{}, false
}

// startClaim starts writing claim for holder, bounded by the claim timeout and not by ctx (only
// its values are kept). Without a write started (nil), it returns the Place's reason: a key whose
// claim is already being written on this replica is not written again (claim_pending for the
// same holder, whose grant will be parked; fill_in_progress for another), and past
// claimsInFlight writes under way the claim fails.
func (s *Service) startClaim(ctx context.Context, claim *pb.FillClaim, ttl time.Duration, holder string) (*claimCall, string) {
	if other, writing := s.parked.writing(claim.Key, holder); writing {
		if other {
			return nil, string(placement.ReasonFillInProgress)
		}
		return nil, ReasonClaimPending
	}
	select {
	case s.claimSlots <- struct{}{}:
	default:
		s.parked.done(claim.Key)
		s.metrics.fills.WithLabelValues("claim_backlog").Inc()
		return nil, string(placement.ReasonClaimFailed)
	}
	call := &claimCall{result: make(chan claimResult, 1)}
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.ClaimTimeout)
	go func() {
		defer func() { <-s.claimSlots }()
		defer cancel()
		defer s.parked.done(claim.Key) // after the claim is parked: a Place in between would write again
		// The claim's lease runs for at least ttl from before the write: what is left of it is
		// counted from here.
		began := time.Now()
		granted, err := s.reg.Claim(wctx, claim, ttl)
		if err != nil {
			s.claimFailed(claim, err)
		} else {
			s.once.Recovered("claim", "fill claims recorded again")
		}
		res := claimResult{granted: granted, err: err}
		call.mu.Lock()
		call.done = true
		left := call.left
		if left == 0 {
			call.result <- res
		}
		call.mu.Unlock()
		switch {
		case err != nil && left != 0:
			// Its Place was answered claim_pending (or its caller left): counted here, as the
			// Places answered claim_failed are by their decisions.
			s.metrics.fills.WithLabelValues("claim_failed_late").Inc()
		case err != nil || !granted || left == 0:
		case left == leftWaiting:
			s.parked.park(s, holder, claim, ttl, began)
		default:
			s.releaseOrphan(claim) // counted as cancelled by its Place
		}
	}()
	return call, ""
}

// claimFailed handles a claim etcd did not record: claims are skipped for a second so that Place
// keeps answering at snapshot speed, and a claim etcd may have committed is released.
func (s *Service) claimFailed(claim *pb.FillClaim, err error) {
	s.claimsBrokenUntil.Store(s.cfg.Now().Add(time.Second).UnixNano())
	s.once.Warn("claim", "cannot record fill claims; answering inline without fills", "err", err)
	if errors.Is(err, targets.ErrOutcomeUnknown) {
		s.releaseOrphan(claim)
	}
}

// parkedClaim is a claim won after its Place was answered, kept for its holder.
type parkedClaim struct {
	claim   *pb.FillClaim
	holder  string
	ttl     time.Duration
	written time.Time
	timer   *time.Timer
}

// parkedClaims are late grants by key, and the keys whose claims are being written.
type parkedClaims struct {
	mu      sync.Mutex
	m       map[string]*parkedClaim
	writers map[string]string // key → holder
}

// writing records that holder's claim of key is being written, unless one already is: then it
// reports whether that one is another holder's.
func (p *parkedClaims) writing(key, holder string) (other, under bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if w, ok := p.writers[key]; ok {
		return w != holder, true
	}
	if p.writers == nil {
		p.writers = map[string]string{}
	}
	p.writers[key] = holder
	return false, false
}

// done records that the write of key's claim has ended.
func (p *parkedClaims) done(key string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.writers, key)
}

// park keeps claim for holder's next Place of its key, for parkFor; then it is released.
func (p *parkedClaims) park(s *Service, holder string, claim *pb.FillClaim, ttl time.Duration, written time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m == nil {
		p.m = map[string]*parkedClaim{}
	}
	if holder == "" || len(p.m) >= maxParked || p.m[claim.Key] != nil {
		s.metrics.fills.WithLabelValues("parked_refused").Inc()
		s.releaseOrphan(claim)
		return
	}
	c := &parkedClaim{claim: claim, holder: holder, ttl: ttl, written: written}
	c.timer = time.AfterFunc(min(parkFor, ttl/4), func() {
		p.mu.Lock()
		mine := p.m[claim.Key] == c
		if mine {
			delete(p.m, claim.Key)
		}
		p.mu.Unlock()
		if mine {
			s.metrics.fills.WithLabelValues("parked_released").Inc()
			s.releaseOrphan(claim)
		}
	})
	p.m[claim.Key] = c
	s.metrics.fills.WithLabelValues("parked").Inc()
}

// parkedGrant is a parked claim handed to its holder, with what is left of its TTL.
type parkedGrant struct {
	claim *pb.FillClaim
	ttl   time.Duration
}

// take removes and returns the claim parked for holder on key, if any.
func (p *parkedClaims) take(key, holder string) (parkedGrant, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	c := p.m[key]
	if c == nil || c.holder != holder {
		return parkedGrant{}, false
	}
	c.timer.Stop()
	delete(p.m, key)
	return parkedGrant{claim: c.claim, ttl: c.ttl - time.Since(c.written)}, true
}

// takeAll removes and returns every parked claim (at a stop, to release them).
func (p *parkedClaims) takeAll() []*pb.FillClaim {
	p.mu.Lock()
	defer p.mu.Unlock()
	var all []*pb.FillClaim
	for k, c := range p.m {
		c.timer.Stop()
		all = append(all, c.claim)
		delete(p.m, k)
	}
	return all
}
