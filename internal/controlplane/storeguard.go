package controlplane

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/targets"
)

// The store guard keeps redirects naming the bytes that were verified (DESIGN.md invariant 11).
// A record's bytes can change behind Detour's back: someone releases the hold (blob.Store.Hold)
// and replaces or deletes the object, or a tool with rights over holds does. Three things bound
// how long a redirect can name such bytes:
//
//   - Location URLs pin the record's generation where the URL form allows (blob.LocationURLAt):
//     a replaced object then answers 404, never other bytes.
//   - Bucket notifications (StoreEventsConfig): a change to an object a record names retires the
//     record as soon as one replica receives it. Deletions and replacements are told by the event
//     alone (generations); other changes are checked against the store.
//   - Verification after a start. A replica that starts does not know what changed while it was
//     not listening, so it redirects to a target's records only once a listing of the target's
//     bucket, taken after its event stream was in place, has confirmed them (records missing or
//     at another generation are retired, unless too many for one round: retireguard.go). Until
//     then each record is checked against the store (one Stat) before its first redirect, and
//     redirected only if it is intact. Cost at millions of records: one listing per target per
//     start (a thousand objects per list call) in the background, plus a Stat per record
//     redirected to before the listing ends; Place waits for that Stat at most half of its
//     deadline and answers inline meanwhile. Neither needs the janitor's lease.
//
// Without an event stream, the listing at start still verifies records, and later changes are found
// by the janitor's reconcile (every ReconcileInterval) and by agents' location checks.

// ReasonUnverified answers inline: the copy's record has not been confirmed against the store
// since this replica started (it is being checked).
const ReasonUnverified = "unverified"

// maxChecked bounds the records remembered as checked one by one before their target's listing
// ends (about 100 bytes each).
const maxChecked = 1 << 18

type storeGuard struct {
	s *Service
	// trusted holds the uids of the targets whose records a listing has confirmed since this
	// replica started (copy on write: read on every redirect).
	trusted atomic.Pointer[map[string]bool]
	mu      sync.Mutex
	checked map[recordRef]bool // records found intact one by one, while their target is not trusted
	flights map[recordRef]*recordCheck
	refused map[string]time.Time // uid → when its confirmation was last refused (errRetirementRefused)
	m       guardMetrics
}

// recordRef names one record's bytes.
type recordRef struct {
	key        targets.Key
	uid        string
	generation int64
}

type recordCheck struct {
	done chan struct{}
	ok   bool
}

type guardMetrics struct {
	events    *prometheus.CounterVec
	detection prometheus.Histogram
	checks    *prometheus.CounterVec
	untrusted prometheus.Gauge
	stream    prometheus.Gauge
}

func newStoreGuard(s *Service) *storeGuard {
	g := &storeGuard{s: s, checked: map[recordRef]bool{}, flights: map[recordRef]*recordCheck{}, refused: map[string]time.Time{}}
	g.trusted.Store(&map[string]bool{})
	g.m = guardMetrics{
		events: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_store_events_total",
			Help: "Bucket notifications received, by event type and outcome (no_record, intact, retired, failed)."},
			[]string{"type", "outcome"}),
		detection: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "detour_store_change_detection_seconds",
			Help:    "From a change's notification being published to the record of the changed bytes being retired.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 14)}),
		checks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_store_record_checks_total",
			Help: "Records checked against the store before their first redirect after a start, by outcome (intact, retired, failed, waited)."},
			[]string{"outcome"}),
		untrusted: prometheus.NewGauge(prometheus.GaugeOpts{Name: "detour_store_unverified_targets",
			Help: "Targets whose records no listing has confirmed since this replica started (their records are checked one by one)."}),
		stream: prometheus.NewGauge(prometheus.GaugeOpts{Name: "detour_store_events_receiving",
			Help: "1 while this replica pulls its targets' bucket notifications."}),
	}
	s.metrics.Registry.MustRegister(g.m.events, g.m.detection, g.m.checks, g.m.untrusted, g.m.stream)
	return g
}

func (g *storeGuard) isTrusted(uid string) bool { return (*g.trusted.Load())[uid] }

func (g *storeGuard) trust(uid string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	next := map[string]bool{uid: true}
	for u := range *g.trusted.Load() {
		next[u] = true
	}
	g.trusted.Store(&next)
	for ref := range g.checked {
		if ref.uid == uid {
			delete(g.checked, ref)
		}
	}
}

// admit says whether obj, key's copy at target t, may be redirected to: its target's records were
// confirmed since the start, or this record was checked on its own (now, waiting at most half of
// ctx's remaining time and a second).
func (g *storeGuard) admit(ctx context.Context, key targets.Key, obj *targets.Object) bool {
	if g.isTrusted(obj.Home().TargetUID) {
		return true
	}
	ref := recordRef{key: key, uid: obj.Home().TargetUID, generation: obj.Generation}
	g.mu.Lock()
	if g.checked[ref] {
		g.mu.Unlock()
		return true
	}
	c := g.flights[ref]
	if c == nil {
		c = &recordCheck{done: make(chan struct{})}
		g.flights[ref] = c
		go g.checkRecord(ref, key, *obj, c)
	}
	g.mu.Unlock()
	wait := time.Second
	if dl, ok := ctx.Deadline(); ok {
		wait = min(wait, time.Until(dl)/2)
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-c.done:
		return c.ok
	case <-t.C:
	case <-ctx.Done():
	}
	g.m.checks.WithLabelValues("waited").Inc()
	return false
}

// checkRecord compares one record with what the store holds, retiring it if the bytes changed.
func (g *storeGuard) checkRecord(ref recordRef, key targets.Key, obj targets.Object, c *recordCheck) {
	defer func() {
		g.mu.Lock()
		delete(g.flights, ref)
		if c.ok && len(g.checked) < maxChecked && !g.isTrusted(ref.uid) {
			g.checked[ref] = true
		}
		g.mu.Unlock()
		close(c.done)
	}()
	st := g.s.cfg.Store
	if st == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := st.Stat(ctx, obj.Home().Bucket, obj.ObjectName(key))
	reason, detail, err := storedProblem(&obj, a, err)
	switch {
	case err != nil:
		g.m.checks.WithLabelValues("failed").Inc()
		g.s.once.Warn("record-check", "cannot check records against the store; they are not redirected to until they are checked", "err", err)
	case reason == "":
		g.s.once.Forget("record-check")
		g.m.checks.WithLabelValues("intact").Inc()
		c.ok = true
	default:
		g.m.checks.WithLabelValues("retired").Inc()
		_ = g.retire(ctx, key, &obj, reason, detail)
	}
}

// storedProblem compares what the store says of a record's object with the record: reason
// "deleted" or "replaced" (another generation, size or CRC32C) or "changed" (its content type),
// with a detail; "" if intact. err: the store could not be asked.
func storedProblem(o *targets.Object, a blob.Attrs, err error) (reason, detail string, _ error) {
	switch {
	case errors.Is(err, blob.ErrNotFound):
		return "deleted", "the object is gone", nil
	case err != nil:
		return "", "", err
	case a.Generation != o.Generation || a.Size != o.Size || a.CRC32C != o.CRC32C:
		return "replaced", fmt.Sprintf("generation %d, %d bytes, crc32c %08x; the record says generation %d, %d bytes, crc32c %08x",
			a.Generation, a.Size, a.CRC32C, o.Generation, o.Size, o.CRC32C), nil
	case a.ContentType != o.Home().MediaType:
		return "changed", fmt.Sprintf("content type %q, the record says %q", a.ContentType, o.Home().MediaType), nil
	}
	return "", "", nil
}

// retire removes a record whose bytes changed (if it is still at the revision read), queueing
// whatever is left of them for deletion. Agents drop its redirects on the invalidation.
func (g *storeGuard) retire(ctx context.Context, key targets.Key, o *targets.Object, reason, detail string) error {
	s := g.s
	wctx, cancel := s.writeCtx(context.WithoutCancel(ctx))
	defer cancel()
	n, err := s.reg.Retire(wctx, []targets.Retirement{{Key: key.String(), Target: o.Target(), ModRevision: o.ModRevision,
		Garbage: targets.GarbageOf(o.Proto(key), "store: "+reason, s.cfg.Now())}})
	if err != nil {
		return err
	}
	s.metrics.retired.WithLabelValues("store_" + reason).Add(float64(n))
	if n > 0 {
		s.cfg.Log.Warn("a stored object changed behind Detour's back; its record is retired and no redirect names it",
			"key", key.String(), "target", o.Target(), "reason", reason, "detail", detail)
	}
	return nil
}

// storeEvent handles one bucket notification: the records of the object it names are retired
// if the event says, or the store confirms, that their bytes are no longer there. An error leaves
// the notification to be delivered again.
func (g *storeGuard) storeEvent(ctx context.Context, ev blob.Event, published time.Time) error {
	outcome, err := g.handleEvent(ctx, ev, published)
	g.m.events.WithLabelValues(ev.Type, outcome).Inc()
	return err
}

func (g *storeGuard) handleEvent(ctx context.Context, ev blob.Event, published time.Time) (string, error) {
	if len(ev.Name) < 64 {
		return "no_record", nil
	}
	key, ok := targets.ParseKey(ev.Name[len(ev.Name)-64:])
	if !ok {
		return "no_record", nil // the canary, or not Detour's
	}
	snap := g.s.w.Snapshot()
	outcome := "no_record"
	copies := snap.Copies(key)
	for i := range copies {
		o := &copies[i]
		if o.Home().Bucket != ev.Bucket || o.ObjectName(key) != ev.Name {
			continue
		}
		reason, detail := "", ""
		switch {
		case (ev.Type == blob.EventFinalize || ev.Type == blob.EventMetadata) && ev.Generation <= o.Generation,
			(ev.Type == blob.EventDelete || ev.Type == blob.EventArchive) && ev.Generation != o.Generation:
			// The record's own writing, a metadata change that leaves its bytes, news of an
			// older generation (generations only grow: an emulator that gives a metadata update a
			// new generation announces the upload's first one late), or another generation going
			// away.
			if outcome == "no_record" {
				outcome = "intact"
			}
			continue
		case ev.Type == blob.EventFinalize:
			reason, detail = "replaced", fmt.Sprintf("generation %d was written over generation %d", ev.Generation, o.Generation)
		case ev.OverwrittenBy != 0:
			// The replaced generation's own notification (it may come before the new one's).
			reason, detail = "replaced", fmt.Sprintf("generation %d was written over generation %d", ev.OverwrittenBy, o.Generation)
		case ev.Type == blob.EventDelete:
			reason, detail = "deleted", fmt.Sprintf("generation %d was deleted", ev.Generation)
		case ev.Type == blob.EventArchive:
			reason, detail = "replaced", fmt.Sprintf("generation %d became noncurrent", ev.Generation)
		default:
			// A metadata change that came with a newer generation (an emulator that keeps one
			// generation per object), or an event type this code does not know: ask the store.
			if g.s.cfg.Store == nil {
				continue
			}
			sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			a, err := g.s.cfg.Store.Stat(sctx, o.Home().Bucket, ev.Name)
			cancel()
			var serr error
			if reason, detail, serr = storedProblem(o, a, err); serr != nil {
				return "failed", serr
			}
			if reason == "" {
				if outcome == "no_record" {
					outcome = "intact"
				}
				continue
			}
		}
		if err := g.retire(ctx, key, o, reason, detail); err != nil {
			return "failed", err
		}
		outcome = "retired"
		if !published.IsZero() {
			g.m.detection.Observe(time.Since(published).Seconds())
		}
	}
	return outcome, nil
}

// run follows the bucket notifications (when configured) and confirms each target's records with
// a listing, at start and for every target that appears, until ctx ends.
func (g *storeGuard) run(ctx context.Context) {
	s := g.s
	if s.cfg.Store == nil {
		return
	}
	// Notifications are matched against the snapshot, so they wait for its load (those of
	// records a start missed are found by the listings).
	select {
	case <-s.w.Ready():
	case <-ctx.Done():
		return
	}
	var ev *storeEvents
	cfg := s.cfg.StoreEvents
	if cfg.Subscription == "" {
		s.cfg.Log.Warn("no store events configured (--store-events-subscription): objects replaced or deleted behind Detour's back are found only by the reconcile and agents' location checks",
			"reconcile_interval", s.cfg.Janitor.ReconcileInterval)
	} else {
		var err error
		if ev, err = newStoreEvents(ctx, cfg); err != nil {
			s.cfg.Log.Error("cannot follow store events", "err", err)
			ev = nil
		} else {
			defer ev.close()
			ready := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(1)
			go func() { defer wg.Done(); g.follow(ctx, ev, ready) }()
			defer wg.Wait()
			// The listings below should begin once changes are kept for the subscription; a
			// Pub/Sub that does not answer delays them a while, not for ever.
			select {
			case <-ready:
			case <-time.After(10 * time.Second):
				s.cfg.Log.Warn("store events not set up yet; verifying records without them meanwhile", "subscription", cfg.Subscription)
			case <-ctx.Done():
				return
			}
		}
	}
	g.confirmTargets(ctx, ev)
}

// follow sets the subscription up and pulls it, retrying both until ctx ends; ready is closed once
// the subscription is in place.
func (g *storeGuard) follow(ctx context.Context, ev *storeEvents, ready chan struct{}) {
	s := g.s
	for ctx.Err() == nil {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := ev.setup(sctx)
		cancel()
		if err == nil {
			break
		}
		s.once.Warn("store-events", "cannot set up the store events subscription; retrying", "err", err)
		sleepCtx(ctx, 2*time.Second)
	}
	close(ready)
	for ctx.Err() == nil {
		g.m.stream.Set(1)
		s.once.Recovered("store-events", "receiving store events", "subscription", ev.cfg.Subscription)
		err := ev.receive(ctx, g.storeEvent)
		g.m.stream.Set(0)
		if ctx.Err() != nil {
			return
		}
		s.once.Warn("store-events", "store events stopped; retrying", "err", err)
		sleepCtx(ctx, 2*time.Second)
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// confirmTargets lists every target not trusted yet, again whenever the target set changes, and
// retries failures every few seconds.
func (g *storeGuard) confirmTargets(ctx context.Context, ev *storeEvents) {
	notified := map[string]bool{} // bucket/prefix with a notification to the topic
	retry := time.NewTicker(3 * time.Second)
	defer retry.Stop()
	released := false
	began := time.Now()
	for ctx.Err() == nil {
		snap := g.s.w.Snapshot()
		var pending int
		round := func() { pending = g.confirmRound(ctx, ev, snap, notified) }
		if released {
			// A target that appears later, or a retry: no bound (boundedWork is for the
			// start's listings, which follow etcd's restart; under traffic it slows Place).
			round()
		} else {
			boundedWork(round)
		}
		if pending == 0 && !released {
			// From here on redirects need no Stat each: the operator's mark of a start done.
			g.s.cfg.Log.Info("every target's records confirmed against its bucket", "targets", len(snap.Targets()),
				"took", time.Since(began).Round(time.Millisecond).String())
			// The listings decoded an object's worth of garbage per record: give it back now
			// rather than over minutes.
			releaseMemory(g.s.cfg.Log, "targets' records confirmed against their buckets")
			released = true
		}
		var again <-chan time.Time
		if pending > 0 {
			again = retry.C
		}
	wait:
		for cur := g.s.w.Snapshot(); cur.TargetsRevision == snap.TargetsRevision; cur = g.s.w.Snapshot() {
			select {
			case <-ctx.Done():
				return
			case <-again:
				break wait
			case <-cur.Superseded():
			}
		}
	}
}

// confirmRound makes sure of the notifications of snap's targets and lists those not trusted yet,
// four at a time; it returns how many are still not trusted. A target whose listing missed too
// many records (errRetirementRefused) is listed again a ReconcileInterval later, not at every
// round: until then its records are checked one by one.
func (g *storeGuard) confirmRound(ctx context.Context, ev *storeEvents, snap *targets.Snapshot, notified map[string]bool) int {
	s := g.s
	var todo []*pb.Target
	for _, t := range snap.Targets() {
		where := t.GetStore().GetBucket() + "/" + t.GetStore().GetPrefix()
		if ev != nil && ev.cfg.Topic != "" && !notified[where] && g.ensureNotification(ctx, ev, t) {
			notified[where] = true
		}
		if !g.isTrusted(t.Uid) {
			todo = append(todo, t)
		}
	}
	untrusted := len(todo)
	g.mu.Lock()
	todo = slices.DeleteFunc(todo, func(t *pb.Target) bool {
		at, ok := g.refused[t.Uid]
		return ok && s.cfg.Now().Sub(at) < s.cfg.Janitor.ReconcileInterval
	})
	g.mu.Unlock()
	var pending atomic.Int64
	pending.Store(int64(untrusted))
	g.m.untrusted.Set(float64(untrusted))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 4)
	for _, t := range todo {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			err := g.confirm(ctx, t)
			switch {
			case errors.Is(err, errRetirementRefused):
				// Logged by allowRetirement. A whole listing again is no use for a while: the
				// bucket or the target's registration must change first.
				g.mu.Lock()
				g.refused[t.Uid] = s.cfg.Now()
				g.mu.Unlock()
				return
			case err != nil:
				s.once.Warn("confirm:"+t.Name, "cannot list a target's bucket to confirm its records; they are checked one by one meanwhile",
					"target", t.Name, "err", err)
				return
			}
			s.once.Recovered("confirm:"+t.Name, "target's records confirmed against its bucket", "target", t.Name)
			g.m.untrusted.Set(float64(pending.Add(-1)))
		}()
	}
	wg.Wait()
	return int(pending.Load())
}

// ensureNotification makes t's bucket publish changes under t's prefix to the topic.
func (g *storeGuard) ensureNotification(ctx context.Context, ev *storeEvents, t *pb.Target) bool {
	st, ok := g.s.cfg.Store.(interface {
		EnsureNotification(ctx context.Context, bucket, prefix, topic string) (bool, error)
	})
	if !ok {
		return true
	}
	nctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	made, err := st.EnsureNotification(nctx, t.GetStore().GetBucket(), t.GetStore().GetPrefix(), ev.cfg.Topic)
	if err != nil {
		g.s.once.Warn("notify:"+t.Name, "cannot make the target's bucket notify the store events topic; its changes are found by the reconcile only",
			"target", t.Name, "bucket", t.GetStore().GetBucket(), "topic", ev.cfg.Topic, "err", err)
		return false
	}
	g.s.once.Forget("notify:" + t.Name)
	if made {
		g.s.cfg.Log.Info("bucket notifications to the store events topic made", "target", t.Name,
			"bucket", t.GetStore().GetBucket(), "prefix", t.GetStore().GetPrefix(), "topic", ev.cfg.Topic)
	}
	return true
}

// confirm lists the prefixes t's records live under and retires the records whose object is
// missing or at another generation; t is then trusted. Records made after the listing began were
// verified when they were made. A listing that misses more records than a round may retire
// (allowRetirement) retires none and leaves t untrusted: errRetirementRefused.
func (g *storeGuard) confirm(ctx context.Context, t *pb.Target) error {
	s := g.s
	started := s.cfg.Now()
	records := map[string]int{t.GetStore().GetPrefix(): 0} // prefix → records under it
	snap := s.w.Snapshot()
	snap.EachObject(func(_ targets.Key, o *targets.Object) bool {
		if o.Home().TargetUID == t.Uid {
			records[o.Home().Prefix]++
		}
		return true
	})
	bucket := t.GetStore().GetBucket()
	listed := map[string]*listedObjects{}
	for prefix, n := range records {
		objs := newListedObjects(n)
		err := s.cfg.Store.List(ctx, bucket, prefix, func(l blob.Listed) bool {
			if k, ok := targets.ParseKey(l.Name[len(prefix):]); ok {
				objs.add(k, l.Generation)
			}
			return true
		})
		if err != nil {
			return err
		}
		listed[prefix] = objs
	}
	snap = s.w.Snapshot()
	var gone []targets.Retirement
	var reasons []string
	servable := 0
	snap.EachObject(func(k targets.Key, o *targets.Object) bool {
		objs := listed[o.Home().Prefix]
		if o.Home().TargetUID != t.Uid || !o.Servable(t) || o.Created >= started.UnixNano() || objs == nil {
			return true // (nil: under a prefix no listing covered, so nothing is known of it)
		}
		servable++
		gen, ok := objs.generation(k)
		if ok && gen == o.Generation {
			return true
		}
		reason := "deleted"
		if ok {
			reason = "replaced"
		}
		gone = append(gone, targets.Retirement{Key: k.String(), Target: t.Name, ModRevision: o.ModRevision,
			Garbage: targets.GarbageOf(o.Proto(k), "store: "+reason, s.cfg.Now())})
		reasons = append(reasons, reason)
		return true
	})
	if !s.allowRetirement(t, retirePathConfirm, len(gone), servable) {
		return fmt.Errorf("%w: %d of %d", errRetirementRefused, len(gone), servable)
	}
	if len(gone) > 0 {
		wctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout*4)
		n, err := s.reg.Retire(wctx, gone)
		cancel()
		if err != nil {
			return err
		}
		for _, r := range reasons[:min(n, len(reasons))] {
			s.metrics.retired.WithLabelValues("store_" + r).Inc()
		}
		s.cfg.Log.Warn("records whose stored objects are gone or replaced retired at start", "target", t.Name, "count", n)
	}
	g.trust(t.Uid)
	return nil
}

// unverifiedTargets is the number of targets whose records no listing has confirmed since this
// replica started.
func (g *storeGuard) unverifiedTargets() int {
	n := 0
	for _, t := range g.s.w.Snapshot().Targets() {
		if !g.isTrusted(t.Uid) {
			n++
		}
	}
	return n
}
