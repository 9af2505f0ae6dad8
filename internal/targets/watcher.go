package targets

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cenkalti/backoff/v5"
	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

func tsOf(ns int64) *timestamppb.Timestamp { return timestamppb.New(time.Unix(0, ns)) }

// Watcher keeps the current Snapshot: a consistent read at revision R (or a checkpoint at R and the
// history since: resume.go), then a watch from R+1 whose every response becomes a new snapshot,
// swapped in atomically. A watch that ends is started again from the last revision applied; only
// history compacted past it, or an unreachable etcd at start, makes it read everything, with
// backoff, while the last snapshot keeps serving.
type Watcher struct {
	cli      *clientv3.Client
	prefix   string
	log      *slog.Logger
	pageSize int64
	cur      atomic.Pointer[Snapshot]
	ready    chan struct{}
	readyOne sync.Once
	// confirmed (unix ns) is when etcd last confirmed the snapshot current: a watch response with
	// events, or a progress notification the watcher asks for every progressInterval.
	confirmed        atomic.Int64
	progressInterval time.Duration
	invalidations    *invalidationLog
	// progress is the latest full read's.
	progress loadProgress
	// noStream is set once etcd has refused a RangeStream: later loads read in pages.
	noStream atomic.Bool
	// streams is how many RangeStreams over sub-ranges a load reads at once.
	streams int
	// local, when set, reads from an etcd member in this process (ReadLocally), localChunk keys
	// at a time.
	local      LocalRange
	localChunk int64
	cp         checkpoints
	dbcopy     dbCopies
	// walked is the snapshot ServeMemberCopy served, for Run's first load; behind (unix ns) is
	// when one that lacked events etcd had committed was replaced (memberdb.go).
	walked *Snapshot
	behind atomic.Int64
}

// NewWatcher returns a watcher of the registry's prefix. Run must be called to start it.
func NewWatcher(cli *clientv3.Client, prefix string, log *slog.Logger) *Watcher {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	if log == nil {
		log = slog.Default()
	}
	w := &Watcher{cli: cli, prefix: prefix, log: log, pageSize: 5000, ready: make(chan struct{}), progressInterval: 5 * time.Second,
		invalidations: newInvalidationLog(1 << 16), streams: 4, localChunk: 4096}
	w.cur.Store(emptySnapshot())
	return w
}

// Snapshot returns the current snapshot.
func (w *Watcher) Snapshot() *Snapshot { return w.cur.Load() }

// Confirmed is when etcd last confirmed that the snapshot is current (zero before the first load).
// While the watch is healthy it is at most a few seconds old even when nothing changes, so the time
// since it measures staleness.
func (w *Watcher) Confirmed() time.Time {
	if ns := w.confirmed.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// Ready is closed once the first full read has completed.
func (w *Watcher) Ready() <-chan struct{} { return w.ready }

// Run keeps the snapshot current until ctx ends.
func (w *Watcher) Run(ctx context.Context) error {
	retry := backoff.NewExponentialBackOff()
	retry.InitialInterval, retry.MaxInterval = 100*time.Millisecond, 5*time.Second
	failing := false
	walked := w.walked
	w.walked = nil
	resume := w.cp.path != "" && walked == nil
	for ctx.Err() == nil {
		var rev int64
		var err error
		switch {
		case walked != nil:
			rev, err = w.resumeWalked(ctx, walked)
			if u := (errUnusable{}); errors.As(err, &u) {
				w.log.Warn("the index from the embedded etcd's database file cannot be followed on; reading every record", "err", u.err)
				// What was served is not known to be etcd's: behind until the full read is
				// published, and from then (publish; MemberCopyBehind).
				w.behind.Store(math.MaxInt64)
				w.DropProvisional(u.err.Error())
				walked = nil
				rev, err = w.load(ctx)
			}
		case resume:
			rev, err = w.resume(ctx)
			if u := (errUnusable{}); errors.As(err, &u) {
				w.logUnusable(u.err)
				w.DropProvisional(u.err.Error())
				resume = false
				rev, err = w.load(ctx)
			}
		default:
			rev, err = w.load(ctx)
		}
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			w.outage(ctx, &failing, retry, "etcd read failed; serving the last snapshot", "err", err,
				"revision", w.Snapshot().Revision)
			continue
		}
		walked = nil
		resume = false
		if failing {
			w.log.Info("etcd reachable again; snapshot current", "revision", rev)
			failing = false
		}
		retry.Reset()
		err = w.follow(ctx, rev, retry)
		if ctx.Err() != nil {
			break
		}
		w.log.Warn("etcd's history no longer follows on from the snapshot; re-reading everything", "err", err,
			"revision", w.Snapshot().applied)
	}
	return nil
}

// follow watches from rev and, when a watch ends for any reason but compaction (no leader, a
// closed stream), watches again from the last revision the snapshot applied, after a backoff: the
// snapshot holds every event up to it, so only what happened since is read, not every record
// again. It returns when ctx ends or etcd has compacted the history the snapshot would need.
func (w *Watcher) follow(ctx context.Context, rev int64, retry backoff.BackOff) error {
	failing := false
	for {
		began := time.Now()
		err := w.watch(ctx, rev)
		if ctx.Err() != nil || errors.Is(err, rpctypes.ErrCompacted) {
			return err
		}
		if time.Since(began) > time.Minute { // it ran: a new outage
			retry.Reset()
			failing = false
		}
		rev = w.Snapshot().applied
		if err := w.sameEtcd(ctx, rev); err != nil {
			return err
		}
		if !w.outage(ctx, &failing, retry, "etcd watch ended; following on from the last revision applied", "err", err,
			"revision", rev) {
			return ctx.Err()
		}
	}
}

func (w *Watcher) watch(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	// The watch starts at rev, not rev+1, and skips what the load already holds: etcd sends no
	// progress notifications to a watch that starts past its current revision, so on a quiet
	// cluster a watch from rev+1 would never be confirmed.
	ch := w.cli.Watch(wctx, w.prefix, clientv3.WithPrefix(), clientv3.WithRev(rev), clientv3.WithProgressNotify())
	// etcd sends progress notifications on its own only every 10 minutes by default; asking for
	// them keeps Confirmed fresh while nothing changes, and lets a stalled watch show as staleness.
	progressDone := make(chan struct{})
	defer func() { cancel(); <-progressDone }() // the requester does not outlive the watch
	go func() {
		defer close(progressDone)
		t := time.NewTicker(w.progressInterval)
		defer t.Stop()
		for {
			select {
			case <-wctx.Done():
				return
			case <-t.C:
				_ = w.cli.RequestProgress(wctx)
			}
		}
	}()
	for resp := range ch {
		// Responses already queued behind this one make one snapshot: under a burst of writes a
		// snapshot per write (etcd sends each write's events alone) would copy an index leaf and
		// node per write and wake every reader of the snapshot per write.
		batch := []clientv3.WatchResponse{resp}
	drain:
		for n := len(resp.Events); n < maxEventsPerSnapshot; {
			select {
			case r, ok := <-ch:
				if !ok {
					break drain
				}
				batch = append(batch, r)
				n += len(r.Events)
			default:
				break drain
			}
		}
		var events []*clientv3.Event
		progress := false
		for _, r := range batch {
			if err := r.Err(); err != nil {
				if len(events) > 0 {
					w.applyEvents(events)
				}
				if errors.Is(err, rpctypes.ErrCompacted) {
					return fmt.Errorf("revision %d compacted (now %d): %w", rev+1, r.CompactRevision, err)
				}
				return err
			}
			evs := r.Events
			for len(evs) > 0 && evs[0].Kv.ModRevision <= rev {
				evs = evs[1:]
			}
			if len(evs) > 0 {
				events = append(events, evs...)
			} else if r.IsProgressNotify() {
				progress = true
			}
		}
		switch {
		case len(events) > 0:
			w.applyEvents(events)
		case progress:
			w.confirmed.Store(time.Now().UnixNano())
		}
	}
	return errors.New("watch channel closed")
}

// errNotFollowing is why a snapshot cannot follow etcd's history on from where it is.
var errNotFollowing = errors.New("etcd's history does not follow on from the snapshot")

// sameEtcd checks, before a watch is started again from rev, that etcd is still the cluster the
// snapshot was read from and has not gone back past rev (an etcd restored from a backup or
// replaced behind the same endpoints): errNotFollowing if not. An etcd that does not answer is
// not an error here: the watch will wait for it.
func (w *Watcher) sameEtcd(ctx context.Context, rev int64) error {
	now, cluster, err := w.head(ctx, 5*time.Second)
	if err != nil {
		return nil
	}
	if id := w.cp.clusterID.Load(); id != 0 && cluster != id {
		return fmt.Errorf("%w: etcd is now cluster %x, the snapshot was read from %x", errNotFollowing, cluster, id)
	}
	if now < rev {
		return fmt.Errorf("%w: etcd is at revision %d, behind the snapshot's %d", errNotFollowing, now, rev)
	}
	return nil
}

// head is etcd's revision now and its cluster id, from a read of one key. (A count of the records,
// as a full read takes, walks etcd's whole key index: a second at 3e6 records.)
func (w *Watcher) head(ctx context.Context, timeout time.Duration) (rev int64, cluster uint64, err error) {
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	resp, err := w.cli.Get(rctx, w.prefix+"policy", clientv3.WithCountOnly())
	if err != nil {
		return 0, 0, fmt.Errorf("read etcd's revision: %w", err)
	}
	return resp.Header.Revision, resp.Header.ClusterId, nil
}

// outage logs a failure with its retry (a warning for the first of a run of failures, debug lines
// after it) and waits the next backoff: false if ctx ended meanwhile.
func (w *Watcher) outage(ctx context.Context, failing *bool, retry backoff.BackOff, msg string, args ...any) bool {
	level := slog.LevelWarn
	if *failing {
		level = slog.LevelDebug
	}
	*failing = true
	wait := retry.NextBackOff()
	w.log.Log(ctx, level, msg, append(args, "retry_in", wait)...)
	select {
	case <-time.After(wait):
		return true
	case <-ctx.Done():
		return false
	}
}

// maxEventsPerSnapshot bounds the watch responses taken into one snapshot by their events.
const maxEventsPerSnapshot = 10000

// applyEvents turns the events of one or more watch responses into the next snapshot.
func (w *Watcher) applyEvents(events []*clientv3.Event) {
	next, inval := w.next(w.Snapshot(), events)
	// Logged before the snapshot is published: a stream that sees the new snapshot finds them.
	w.invalidations.add(inval)
	w.publish(next)
}

// next is old with events (in revision order) applied, and the invalidations they make. Its
// revision is its last event's, not the watch response's header revision: a watch
// that started behind is sent older events in batches, each stamped with etcd's current revision,
// and a snapshot must not claim a revision whose events it does not hold yet (WatchTargets
// streams resume from it, and would skip the invalidations still to come).
func (w *Watcher) next(old *Snapshot, events []*clientv3.Event) (*Snapshot, []Invalidation) {
	rev := old.Revision
	if n := len(events); n > 0 {
		rev = max(rev, events[n-1].Kv.ModRevision)
	}
	next := &Snapshot{Revision: rev, TargetsRevision: old.TargetsRevision, targets: old.targets, alive: old.alive,
		health: old.health, policy: old.policy, claims: old.claims, agents: old.agents, homes: old.homes, superseded: make(chan struct{}),
		applied: max(old.applied, rev)}
	copiedTargets, copiedAlive, copiedHealth, copiedClaims, copiedAgents, copiedHomes := false, false, false, false, false, false
	var b *indexBuilder
	for _, ev := range events {
		rest := strings.TrimPrefix(string(ev.Kv.Key), w.prefix)
		switch {
		case strings.HasPrefix(rest, "targets/"):
			next.TargetsRevision = rev
			if !copiedTargets {
				next.targets, copiedTargets = cloneMap(old.targets), true
			}
		case strings.HasPrefix(rest, "alive/"):
			next.TargetsRevision = rev
			if !copiedAlive {
				next.alive, copiedAlive = cloneMap(old.alive), true
			}
		case strings.HasPrefix(rest, "health/"):
			next.TargetsRevision = rev
			if !copiedHealth {
				next.health, copiedHealth = cloneMap(old.health), true
			}
		case rest == "policy":
			next.TargetsRevision = rev
		case strings.HasPrefix(rest, "fills/"):
			if !copiedClaims {
				next.claims, copiedClaims = cloneMap(old.claims), true
			}
		case isAgentKey(rest):
			if !copiedAgents {
				next.agents, copiedAgents = cloneMap(old.agents), true
			}
		case strings.HasPrefix(rest, "homes/"):
			if !copiedHomes {
				next.homes, copiedHomes = cloneMap(old.homes), true
			}
		case strings.HasPrefix(rest, "objects/"):
			if b == nil {
				b = newIndexBuilder(old.objects)
			}
		}
	}
	if b == nil {
		next.objects = old.objects
	}
	var inval []Invalidation
	for _, ev := range events {
		w.apply(next, b, ev.Type, ev.Kv)
		if x, ok := w.invalidation(old, ev); ok {
			inval = append(inval, x)
		}
	}
	if b != nil {
		next.objects = b.build()
	}
	w.finish(next)
	return next, inval
}

// invalidation reports the event as an invalidation if it removed or replaced a copy that old had.
func (w *Watcher) invalidation(old *Snapshot, ev *clientv3.Event) (Invalidation, bool) {
	rest, ok := strings.CutPrefix(string(ev.Kv.Key), w.prefix+"objects/")
	if !ok {
		return Invalidation{}, false
	}
	ks, target, ok := strings.Cut(rest, "/")
	k, valid := ParseKey(ks)
	if !ok || !valid {
		return Invalidation{}, false
	}
	for _, c := range old.Copies(k) {
		if c.Target() == target {
			return Invalidation{Revision: ev.Kv.ModRevision, Key: k, Target: target}, true
		}
	}
	return Invalidation{}, false
}

// apply records one key's new state in snap (whose maps the caller has already copied).
func (w *Watcher) apply(snap *Snapshot, b *indexBuilder, typ mvccpb.Event_EventType, kv *mvccpb.KeyValue) {
	rest := strings.TrimPrefix(string(kv.Key), w.prefix)
	del := typ == mvccpb.DELETE
	switch {
	case strings.HasPrefix(rest, "targets/"):
		name := strings.TrimPrefix(rest, "targets/")
		if del {
			delete(snap.targets, name)
			return
		}
		t := &pb.Target{}
		if err := proto.Unmarshal(kv.Value, t); err != nil {
			w.log.Error("skipping undecodable target", "key", string(kv.Key), "err", err)
			return
		}
		t.Revision = kv.ModRevision
		snap.targets[name] = t
	case strings.HasPrefix(rest, "alive/"):
		name := strings.TrimPrefix(rest, "alive/")
		if del {
			delete(snap.alive, name)
		} else {
			snap.alive[name] = true
		}
	case strings.HasPrefix(rest, "health/"):
		name := strings.TrimPrefix(rest, "health/")
		if del {
			delete(snap.health, name)
			return
		}
		h := &pb.TargetHealth{}
		if err := proto.Unmarshal(kv.Value, h); err != nil {
			w.log.Error("skipping undecodable target health", "key", string(kv.Key), "err", err)
			return
		}
		snap.health[name] = h
	case strings.HasPrefix(rest, "fills/"):
		key := strings.TrimPrefix(rest, "fills/")
		if del {
			delete(snap.claims, key)
			return
		}
		c := &pb.FillClaim{}
		if err := proto.Unmarshal(kv.Value, c); err != nil {
			w.log.Error("skipping undecodable fill claim", "key", string(kv.Key), "err", err)
			return
		}
		snap.claims[key] = c
	case strings.HasPrefix(rest, "objects/"):
		obj := kv.Key[len(w.prefix)+len("objects/"):]
		if del {
			i := bytes.IndexByte(obj, '/')
			var k Key
			if i < 0 || !parseKeyBytes(&k, obj[:i]) {
				w.log.Error("skipping object with a malformed key", "key", string(kv.Key))
				return
			}
			b.remove(k, string(obj[i+1:]))
			return
		}
		k, o, st := w.parseObject(obj, kv.Value, kv.ModRevision, &homeCache{shared: snap.homes})
		switch st {
		case objectReady:
			b.put(k, o)
		case objectNot:
			b.remove(k, string(obj[bytes.IndexByte(obj, '/')+1:]))
		}
	case strings.HasPrefix(rest, "homes/"):
		ref, ok := parseHomeRef([]byte(rest[len("homes/"):]))
		if !ok {
			w.log.Error("skipping home record with a malformed key", "key", string(kv.Key))
			return
		}
		if del {
			delete(snap.homes, ref)
			return
		}
		h, err := decodeHome(ref, kv.Value)
		if err != nil {
			// The records that name it are not served until a write puts it back.
			delete(snap.homes, ref)
			w.log.Error("skipping undecodable home record", "key", string(kv.Key), "err", err)
			return
		}
		snap.homes[ref] = &h
	case isAgentKey(rest):
		w.applyAgent(snap, del, rest, kv.Value)
	case rest == "policy":
		if del {
			snap.policy = &pb.Policy{}
			return
		}
		p := &pb.Policy{}
		if err := proto.Unmarshal(kv.Value, p); err != nil {
			w.log.Error("skipping undecodable policy", "err", err)
			return
		}
		p.Revision = kv.ModRevision
		snap.policy = p
	}
}

// finish computes what depends on more than one key: target health. A target is healthy when its
// heartbeat (if it has one) is alive and the prober's latest verdict on this target (same uid)
// passed. A target the prober has not yet judged is not healthy: nothing is redirected to a URL
// nobody has fetched.
func (w *Watcher) finish(snap *Snapshot) {
	changed := false
	for name, t := range snap.targets {
		reason := ""
		h := snap.health[name]
		switch {
		case t.Heartbeat && !snap.alive[name]:
			reason = "heartbeat expired"
		case h == nil || h.TargetUid != t.Uid:
			reason = "not yet probed"
		case !h.Healthy:
			reason = "probe failing: " + h.Reason
		}
		if t.Healthy != (reason == "") || t.UnhealthyReason != reason {
			if !changed {
				snap.targets, changed = cloneMap(snap.targets), true
			}
			c := proto.Clone(t).(*pb.Target)
			c.Healthy, c.UnhealthyReason = reason == "", reason
			snap.targets[name] = c
		}
	}
}

func (w *Watcher) publish(snap *Snapshot) {
	snap.Built = time.Now()
	// A walk etcd did not follow on from is being replaced (Run): it was behind until now. Before
	// the swap, which may make the watcher ready and start the janitor.
	w.behind.CompareAndSwap(math.MaxInt64, snap.Built.UnixNano())
	w.confirmed.Store(snap.Built.UnixNano())
	old := w.cur.Swap(snap)
	close(old.superseded)
	w.readyOne.Do(func() { close(w.ready) })
}

func cloneMap[K comparable, V any](m map[K]V) map[K]V {
	out := make(map[K]V, len(m)+1)
	for k, v := range m {
		out[k] = v
	}
	return out
}
