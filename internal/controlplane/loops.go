package controlplane

import (
	"context"
	"time"
)

// Names of the periodic loops, the label of detour_loop_rounds_total. The janitor's (probe, sweep,
// reconcile, copy) count only while this replica is elected; the others run on every replica.
const (
	loopProbe        = "probe"
	loopSweep        = "sweep"
	loopReconcile    = "reconcile"
	loopCopy         = "copy"
	loopExtend       = "extend"
	loopCopyRequests = "copy_requests"
	loopEtcdStatus   = "etcd_status"
)

// every runs fn at once and then every interval until ctx ends, and once more for each request
// received on now, which is answered when that round ends (nil, or ctx's error if it was cut
// short). Each completed round is counted in detour_loop_rounds_total{loop}.
func (d *deps) every(ctx context.Context, loop string, interval time.Duration, now <-chan chan error, fn func(context.Context)) {
	d.loop(ctx, loop, interval, now, fn, false)
}

// everyLater is every, except that the first round waits an interval (or a request on now).
func (d *deps) everyLater(ctx context.Context, loop string, interval time.Duration, now <-chan chan error, fn func(context.Context)) {
	d.loop(ctx, loop, interval, now, fn, true)
}

func (d *deps) loop(ctx context.Context, loop string, interval time.Duration, now <-chan chan error, fn func(context.Context), later bool) {
	t := time.NewTicker(interval)
	defer t.Stop()
	rounds := d.metrics.rounds.WithLabelValues(loop)
	var asked chan error
	if later {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case asked = <-now:
		}
	}
	for {
		fn(ctx)
		if ctx.Err() == nil {
			rounds.Inc()
		}
		if asked != nil {
			asked <- ctx.Err()
			asked = nil
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case asked = <-now:
		}
	}
}
