package controlplane

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"golang.org/x/sync/errgroup"

	"github.com/detourhq/detour/internal/targets"
)

// JanitorConfig sets the intervals of the work one replica at a time does for the fleet.
type JanitorConfig struct {
	// ProbeInterval is how often each target's client-facing URL is fetched (default 2s);
	// ProbeTimeout bounds one fetch (default ProbeInterval). ProbeFailures consecutive failures
	// make a target unhealthy (default 3), ProbeRecoveries consecutive successes healthy again
	// (default 2): detection within ProbeFailures·ProbeInterval + ProbeTimeout.
	ProbeInterval   time.Duration
	ProbeTimeout    time.Duration
	ProbeFailures   int
	ProbeRecoveries int
	// SweepInterval is how often expired and stale records are retired and queued bytes deleted
	// (default 30s).
	SweepInterval time.Duration
	// ReconcileInterval is how often each target's bucket prefix is listed against the index
	// (default 10m).
	ReconcileInterval time.Duration
	// MaxRetireShare is the share of a target's records one reconcile round, or one replica's
	// confirmation of the target after its start, may retire (default DefaultMaxRetireShare; at
	// least 3 records whatever the share; 1: any number). A round whose listing misses more retires
	// none; the same share of the objects a reconcile listed bounds the orphans it deletes
	// (retireguard.go).
	MaxRetireShare float64
	// GarbageBatch is how many queued deletions one sweep takes (default 500).
	GarbageBatch int
	// GarbageGrace is how long the bytes of a retired record stay before they are deleted, so that
	// every agent has received the record's invalidation (and stopped handing out its location)
	// first (default 15s).
	GarbageGrace time.Duration
	// OrphanAge is how old a stored object that no record or claim accounts for must be before the
	// reconciler deletes it (default: twice the policy's fill claim TTL).
	OrphanAge time.Duration
	// ExtendInterval is how often each replica writes the expiry extensions of the objects it
	// redirected to (default 5s).
	ExtendInterval time.Duration
	// CopyInterval is how often each replica queues the cross-region copies its redirect counts
	// call for, and how often the elected janitor works through that queue and through the sole
	// copies of draining targets (default 2s).
	CopyInterval time.Duration
	// CopyRate bounds the server-side copies the janitor starts per second, cross-region copies
	// and drain migration together (default 5).
	CopyRate float64
	// HotKeys bounds the (key, region) pairs each replica counts cross-region redirects for
	// (default 100000, about 12 MB).
	HotKeys int
}

func (c *JanitorConfig) defaults() {
	if c.ProbeInterval <= 0 {
		c.ProbeInterval = 2 * time.Second
	}
	if c.ProbeTimeout <= 0 {
		c.ProbeTimeout = c.ProbeInterval
	}
	if c.ProbeFailures <= 0 {
		c.ProbeFailures = 3
	}
	if c.ProbeRecoveries <= 0 {
		c.ProbeRecoveries = 2
	}
	if c.SweepInterval <= 0 {
		c.SweepInterval = 30 * time.Second
	}
	if c.ReconcileInterval <= 0 {
		c.ReconcileInterval = 10 * time.Minute
	}
	if c.MaxRetireShare <= 0 || math.IsNaN(c.MaxRetireShare) {
		c.MaxRetireShare = DefaultMaxRetireShare
	}
	if c.GarbageBatch <= 0 {
		c.GarbageBatch = 500
	}
	if c.GarbageGrace <= 0 {
		c.GarbageGrace = 15 * time.Second
	}
	if c.ExtendInterval <= 0 {
		c.ExtendInterval = 5 * time.Second
	}
	if c.CopyInterval <= 0 {
		c.CopyInterval = 2 * time.Second
	}
	if c.CopyRate <= 0 {
		c.CopyRate = 5
	}
	if c.HotKeys <= 0 {
		c.HotKeys = 100000
	}
}

// Janitor is the work one replica at a time does for the whole fleet, while it holds the janitor
// election (an etcd election under the registry's prefix): probing targets (prober.go), sweeping
// expired and stale records, deleting retired objects' bytes and reconciling buckets with the
// index (sweep.go), and making the copies the fleet needs (copier.go). Every etcd write of a term
// goes through a registry fenced by the term's election key (targets.Registry.Fenced), so a
// janitor that has been deposed and not noticed yet writes nothing.
type Janitor struct {
	*deps
	cli         *clientv3.Client
	id          string
	probeClient *http.Client
	// now carries requests for a round at once (Sweep, Reconcile) to the elected term's loops.
	now map[string]chan chan error
}

// term is one janitor term. Its reg (shadowing the Janitor's) is fenced by the term's election:
// every write the term's loops make goes through it.
type term struct {
	*Janitor
	reg *targets.Registry
}

func newJanitor(d *deps, cli *clientv3.Client, id string) *Janitor {
	return &Janitor{deps: d, cli: cli, id: id, probeClient: &http.Client{Transport: d.cfg.ProbeTransport},
		now: map[string]chan chan error{loopSweep: make(chan chan error), loopReconcile: make(chan chan error)}}
}

// Run campaigns for the janitor role until ctx ends, and does the janitor's work while elected;
// a term that ends (the session or the election key lost) is followed by a new campaign. A replica
// campaigns only once its first snapshot is loaded: it would judge and reconcile against nothing.
func (j *Janitor) Run(ctx context.Context) error {
	select {
	case <-j.w.Ready():
	case <-ctx.Done():
		return nil
	}
	for ctx.Err() == nil {
		err := j.runTerm(ctx)
		if ctx.Err() != nil {
			return nil
		}
		j.once.Warn("janitor", "janitor election or term ended; campaigning again", "err", err)
		select {
		case <-time.After(time.Second):
		case <-ctx.Done():
		}
	}
	return nil
}

// errDeposed ends a term whose election is lost.
var errDeposed = errors.New("janitor deposed")

// runTerm campaigns and, once elected, runs the janitor's loops until ctx ends or the election is
// lost; it resigns on the way out.
func (j *Janitor) runTerm(ctx context.Context) error {
	sess, err := concurrency.NewSession(j.cli, concurrency.WithTTL(10), concurrency.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("election session: %w", err)
	}
	defer sess.Close()
	e := concurrency.NewElection(sess, j.reg.Prefix()+"election/janitor")
	if err := e.Campaign(ctx, j.id); err != nil {
		return fmt.Errorf("campaign: %w", err)
	}
	fence := targets.Fence{Key: e.Key(), Revision: e.Rev()}
	j.once.Forget("janitor")
	j.cfg.Log.Info("elected janitor: probing targets, sweeping, reconciling, copying and compacting etcd", "id", j.id,
		"election_key", fence.Key, "election_revision", fence.Revision)
	j.metrics.janitor.Set(1)
	defer j.metrics.janitor.Set(0)

	t := &term{Janitor: j, reg: j.reg.Fenced(fence)}
	g, tctx := errgroup.WithContext(ctx)
	g.Go(func() error { return j.watchElection(tctx, sess, fence) })
	g.Go(func() error { t.runProber(tctx); return nil })
	g.Go(func() error {
		t.every(tctx, loopSweep, j.cfg.Janitor.SweepInterval, j.now[loopSweep], t.sweep)
		return nil
	})
	g.Go(func() error {
		// Not at once: every replica's start lists its targets' buckets (the store guard), and a
		// janitor elected at its replica's start would list them all a second time alongside
		// (at 1e6 records that doubled the start's listing and held 100–200 MB more for minutes).
		t.everyLater(tctx, loopReconcile, j.cfg.Janitor.ReconcileInterval, j.now[loopReconcile], t.reconcileAll)
		return nil
	})
	g.Go(func() error { t.runCopier(tctx); return nil })
	g.Go(func() error { t.runCompactor(tctx); return nil }) // compaction.go
	err = g.Wait()

	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer cancel()
	_ = e.Resign(rctx)
	if ctx.Err() != nil {
		return nil
	}
	if errors.Is(err, errDeposed) {
		j.cfg.Log.Warn("janitor deposed; standing down", "id", j.id, "err", err)
	}
	return err
}

// watchElection returns errDeposed once the term's election is lost: its session ends (the lease
// could not be kept alive) or its election key is deleted. Until then the fence already refuses
// the term's writes; this makes the term stop trying. It returns nil when ctx ends.
func (j *Janitor) watchElection(ctx context.Context, sess *concurrency.Session, f targets.Fence) error {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := j.cli.Watch(wctx, f.Key, clientv3.WithRev(f.Revision+1))
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-sess.Done():
			return fmt.Errorf("%w: the election session ended", errDeposed)
		case resp, ok := <-ch:
			switch {
			case ctx.Err() != nil:
				return nil
			case !ok:
				return fmt.Errorf("%w: the watch of the election key ended", errDeposed)
			case resp.Err() != nil:
				return fmt.Errorf("%w: the watch of the election key failed: %w", errDeposed, resp.Err())
			}
			for _, ev := range resp.Events {
				if ev.Type == mvccpb.DELETE {
					return fmt.Errorf("%w: the election key was deleted", errDeposed)
				}
			}
		}
	}
}

// Sweep has this replica's janitor sweep at once and waits until that round is done (tests and
// benchmarks; the janitor sweeps every SweepInterval on its own). It waits for this replica to be
// elected first, so it returns only with ctx's error on a replica that is not the janitor.
func (j *Janitor) Sweep(ctx context.Context) error { return j.roundNow(ctx, loopSweep) }

// Reconcile has this replica's janitor list every target's bucket against the index at once and
// waits until that round is done; like Sweep, it waits for this replica to be elected.
func (j *Janitor) Reconcile(ctx context.Context) error { return j.roundNow(ctx, loopReconcile) }

func (j *Janitor) roundNow(ctx context.Context, loop string) error {
	done := make(chan error, 1)
	select {
	case j.now[loop] <- done:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("the janitor's %s round was cut short: %w", loop, err)
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
