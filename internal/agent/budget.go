package agent

import (
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v5"

	"github.com/detourhq/detour/internal/logonce"
)

// fillBudget bounds the fills running at once and the bytes they hold in memory together, so that
// memory stays flat however many clients miss at once. Past either bound the agent declines new
// fills (it tells Place, so no claim is written); a running fill that would push the byte total
// over is aborted, never waited for.
type fillBudget struct {
	maxFills, maxBytes int64
	active, queued     atomic.Int64
}

func (b *fillBudget) canStart() bool {
	return b.active.Load() < b.maxFills && b.queued.Load() < b.maxBytes
}

// start takes a fill slot if one is free.
func (b *fillBudget) start() bool {
	if b.active.Add(1) > b.maxFills || b.queued.Load() >= b.maxBytes {
		b.active.Add(-1)
		return false
	}
	return true
}

func (b *fillBudget) done() { b.active.Add(-1) }

// reserve takes n bytes of the total, if they fit.
func (b *fillBudget) reserve(n int64) bool {
	if b.queued.Add(n) > b.maxBytes {
		b.queued.Add(-n)
		return false
	}
	return true
}

func (b *fillBudget) release(n int64) { b.queued.Add(-n) }

// admitFill decides whether a granted fill runs: the store exists, the budget has room, and the
// target's store breaker lets it through. A fill that runs must end with endFill.
func (a *Agent) admitFill(target string) bool {
	if a.store == nil || !a.budget.start() {
		return false
	}
	if !a.breakers.begin(target) {
		a.budget.done()
		return false
	}
	return true
}

// storeBreakers stop fills to a target whose uploads fail: after a failure the agent lists the
// target as unfillable in Place (so no claim is written for it) for a backoff that grows from 1s
// to 1m; when it passes, the next fill to the target is a trial, and its outcome closes the
// breaker or opens it for the next backoff. One log line per transition.
type storeBreakers struct {
	log *logonce.Set
	mu  sync.Mutex
	m   map[string]*storeBreaker
}

type storeBreaker struct {
	retry     *backoff.ExponentialBackOff
	openUntil time.Time
	trial     bool // a trial fill is running
}

// unfillable lists the targets the agent will not fill now.
func (s *storeBreakers) unfillable(now time.Time) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for name, b := range s.m {
		if b.trial || now.Before(b.openUntil) {
			out = append(out, name)
		}
	}
	return out
}

// begin reports whether a fill to target may run; for an open breaker whose backoff has passed
// it lets exactly one trial through.
func (s *storeBreakers) begin(target string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, open := s.m[target]
	switch {
	case !open:
		return true
	case b.trial || time.Now().Before(b.openUntil):
		return false
	}
	b.trial = true
	return true
}

// result records how a fill's upload to target ended: err is nil on success, else a failure of the
// store (not of the client or the origin).
func (s *storeBreakers) result(target string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, open := s.m[target]
	if err == nil {
		if open {
			delete(s.m, target)
			s.log.Recovered("store:"+target, "uploads to target succeed again; fills resume", "target", target)
		}
		return
	}
	if !open {
		b = &storeBreaker{retry: backoff.NewExponentialBackOff()}
		b.retry.InitialInterval, b.retry.MaxInterval = time.Second, time.Minute
		s.m[target] = b
	}
	b.trial = false
	wait := b.retry.NextBackOff()
	b.openUntil = time.Now().Add(wait)
	s.log.Warn("store:"+target, "uploads to target failing; fills to it paused, retried with backoff",
		slog.String("target", target), slog.String("err", err.Error()), slog.Duration("first_retry_in", wait))
}

// trialEnded releases a trial that ended for a reason that says nothing about the store (the
// client went away, the origin failed), so the next fill can try instead.
func (s *storeBreakers) trialEnded(target string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b, ok := s.m[target]; ok {
		b.trial = false
	}
}
