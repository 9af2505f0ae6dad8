// Package controlplane is one replica of Detour's control plane. Server (server.go) is its
// lifecycle: built from Options, it serves PlacementService for agents and AdminService for
// operators (Service, the gRPC handlers), and runs the janitor (Janitor: election, prober, sweep,
// reconcile, copier) and every background loop under one errgroup that Shutdown stops. Placement
// and every read are answered from the in-memory snapshot of the etcd registry, so they keep
// working while etcd is unreachable; writes go to etcd and fail with Unavailable when it is. It
// knows no wire protocol: the media type of what is stored comes from the agent's request.
package controlplane

import (
	"context"
	"log/slog"
	"net/http"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/admission"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/logonce"
	"github.com/detourhq/detour/internal/placement"
	"github.com/detourhq/detour/internal/targets"
)

// Config configures a Service. Zero fields take defaults.
type Config struct {
	Log *slog.Logger
	// Signer signs V4 URLs for targets that want them; nil: such targets get no redirects.
	Signer *blob.Signer
	// Store is the control plane's own access to the targets' buckets: it verifies every reported
	// fill before the object becomes READY, probes targets, reconciles the index with the buckets
	// and deletes the bytes of retired objects. nil: no fills are granted and no target is ever
	// healthy (nothing that cannot be verified is redirected to).
	Store Store
	// VerifyFullFraction is the share of fills whose bytes are read back and re-hashed before they
	// become READY (0: attributes and recorded hashes only; 1: every fill).
	VerifyFullFraction float64
	// Janitor sets the intervals of probing, sweeping and reconciling.
	Janitor JanitorConfig
	// ProbeTransport fetches canaries through targets' client-facing URLs (default: a clone of
	// http.DefaultTransport).
	ProbeTransport http.RoundTripper
	// WriteTimeout bounds each etcd write an RPC makes (default 5s).
	WriteTimeout time.Duration
	// ClaimTimeout bounds the fill-claim write a Place starts (default 1s). The Place waits for it
	// at most half its caller's deadline; a claim written later is handed to the caller's next
	// Place of the key (parked.go). A failed claim makes the answer INLINE without a fill.
	ClaimTimeout time.Duration
	// RedirectCacheMaxAge bounds how long agents may reuse a redirect without asking (default 1m;
	// negative: agents do not cache redirects).
	RedirectCacheMaxAge time.Duration
	// AgentLagThreshold is how long an agent's applied target set may be behind before ListAgents
	// and detour_agents_lagging flag it (default DefaultAgentLagThreshold).
	AgentLagThreshold time.Duration
	// Etcd configures compaction, defragmentation and the reading of etcd's alarms (compaction.go).
	Etcd EtcdMaintenance
	// Now is the clock (default time.Now).
	Now func() time.Time
	// StoreEvents is where bucket change notifications are pulled from (storeevents.go).
	StoreEvents StoreEventsConfig
}

// Store is what the control plane needs of the blob store (blob.Store implements it).
type Store interface {
	Verify(ctx context.Context, c blob.Claim, full bool) error
	Stat(ctx context.Context, bucket, name string) (blob.Attrs, error)
	Delete(ctx context.Context, bucket, name string, generation int64) error
	List(ctx context.Context, bucket, prefix string, fn func(blob.Listed) bool) error
	Put(ctx context.Context, bucket, name, mediaType string, data []byte) error
	Copy(ctx context.Context, srcBucket, srcName string, srcGeneration int64, dstBucket, dstName string) (blob.Attrs, error)
}

// deps are what the gRPC services and the janitor share: the registry and the watched snapshot,
// the configuration, metrics and the placement view of the snapshot. Neither owns the other.
type deps struct {
	reg     *targets.Registry
	w       *targets.Watcher
	cfg     Config
	metrics *Metrics
	once    *logonce.Set // one warning per lasting fault
	view    atomic.Pointer[view]
	// etcd keeps etcd itself healthy: alarms and sizes read by every replica, compaction by the
	// janitor (alarms.go, compaction.go).
	etcd *etcdKeeper
}

// Service implements the PlacementService and AdminService servers: the handlers and the state
// they keep between calls. Its background loops (Run) are the ones every replica runs: expiry
// extensions, cross-region copy requests, the fleet clock and releases of orphaned claims.
type Service struct {
	pb.UnimplementedPlacementServiceServer
	pb.UnimplementedAdminServiceServer
	*deps

	// lastWrite is the etcd revision of this replica's latest write; reads wait for the snapshot to
	// reach it, so an operator reads what they just wrote.
	lastWrite atomic.Int64
	// claimsBrokenUntil (unix ns) skips fill claims after one failed, see grantFill.
	claimsBrokenUntil atomic.Int64
	// claims bounds each agent's rate of fill claims (nil: unbounded).
	claims    *claimLimiter
	extender  extender
	exposures exposures
	// hot counts cross-region redirects; copyRequests holds the copies its counts call for until
	// runCopyRequests queues them in etcd.
	hot          *hotKeys
	copyRequests pendingCopies
	// fleet remembers when the target set changed, to tell how long agents are behind.
	fleet targetSetClock
	// misses counts each key's misses: a fill is granted only on the policy's min_occurrences-th.
	misses *admission.Sketch
	// orphans are claims no agent knows it holds, for runOrphanReleases to release.
	orphans chan *pb.FillClaim
	// claimSlots bounds the claim writes under way; parked holds the claims won after their Place
	// was answered, for the holder's next Place of the key (parked.go).
	claimSlots chan struct{}
	parked     parkedClaims
	// stopping is closed when the server shuts down: WatchTargets streams end at once (agents
	// reconnect to another replica) instead of holding the graceful stop until its deadline.
	stopping chan struct{}
	// guard keeps redirects naming verified bytes (storeguard.go).
	guard *storeGuard
}

// view is the placement form of a snapshot's targets and policy, rebuilt only when they change
// (not at every fill the index records).
type view struct {
	targetsRevision int64
	provisional     bool // of a clean stop's snapshot: the one etcd confirms replaces it even at the same revision
	targets         map[string]placement.Target
	policy          placement.Policy
	// fleet is targets and policy indexed for placement decisions.
	fleet *placement.Fleet
	// stored is the regions that have an active, healthy target: the only ones a cross-region
	// copy can go to, so the only ones whose redirects are counted.
	stored    map[string]bool
	copies    copySettings
	admission admissionSettings
}

// admissionSettings are the policy's fill admission settings with defaults applied.
type admissionSettings struct {
	minOccurrences uint32
	window         time.Duration
}

// copySettings are the policy's cross-region copy settings with defaults applied.
type copySettings struct {
	off       bool
	threshold uint32
	window    time.Duration
}

// newDeps fills in cfg's defaults and returns what the services and the janitor share.
func newDeps(reg *targets.Registry, w *targets.Watcher, cfg Config) *deps {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = 5 * time.Second
	}
	if cfg.ClaimTimeout <= 0 {
		cfg.ClaimTimeout = time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.AgentLagThreshold <= 0 {
		cfg.AgentLagThreshold = DefaultAgentLagThreshold
	}
	if cfg.RedirectCacheMaxAge == 0 {
		cfg.RedirectCacheMaxAge = time.Minute
	}
	cfg.Janitor.defaults()
	if cfg.ProbeTransport == nil {
		cfg.ProbeTransport = http.DefaultTransport.(*http.Transport).Clone()
	}
	d := &deps{reg: reg, w: w, cfg: cfg, metrics: newMetrics(w), once: logonce.New(cfg.Log)}
	d.etcd = newEtcdKeeper(cfg.Etcd, d.metrics.Registry, d.once, cfg.Log)
	return d
}

// maxOrphans bounds the orphaned claims waiting to be released; past it they expire with their
// lease.
const maxOrphans = 1024

// newService returns the gRPC services over d.
func newService(d *deps) *Service {
	s := &Service{deps: d, hot: newHotKeys(d.cfg.Janitor.HotKeys), misses: admission.New(d.cfg.Now()),
		orphans: make(chan *pb.FillClaim, maxOrphans), claimSlots: make(chan struct{}, claimsInFlight), stopping: make(chan struct{})}
	s.registerFleetMetrics()
	s.guard = newStoreGuard(s)
	return s
}

// Run runs the loops every replica runs, until ctx ends: it writes the expiry extensions and the
// cross-region copy requests its redirects call for, notes when the target set changes (the fleet
// clock), releases orphaned claims and keeps redirects naming verified bytes (the store guard:
// bucket notifications and the listings that confirm records after a start). It returns when all
// of them have stopped.
func (s *Service) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		s.every(ctx, loopExtend, s.cfg.Janitor.ExtendInterval, nil, s.flushExtensions)
		return nil
	})
	g.Go(func() error {
		s.every(ctx, loopCopyRequests, s.cfg.Janitor.CopyInterval, nil, s.flushCopyRequests)
		return nil
	})
	g.Go(func() error { s.runFleetClock(ctx); return nil })
	g.Go(func() error { s.runOrphanReleases(ctx); return nil })
	g.Go(func() error { s.guard.run(ctx); return nil })
	return g.Wait()
}

// Metrics returns the service's metrics.
func (d *deps) Metrics() *Metrics { return d.metrics }

func (d *deps) viewOf(snap *targets.Snapshot) *view {
	if v := d.view.Load(); v != nil && v.targetsRevision == snap.TargetsRevision && v.provisional == snap.Provisional() {
		return v
	}
	v := &view{targetsRevision: snap.TargetsRevision, provisional: snap.Provisional(), targets: make(map[string]placement.Target, len(snap.Targets())),
		stored: map[string]bool{}}
	for _, t := range snap.Targets() {
		v.targets[t.Name] = placement.Target{Name: t.Name, Region: t.Region, Weight: t.Weight,
			State: stateOf(t.State), Healthy: t.Healthy}
		if t.Healthy && t.State == pb.TargetState_TARGET_STATE_ACTIVE && t.Weight > 0 {
			v.stored[t.Region] = true
		}
	}
	p := snap.Policy()
	v.policy = placement.Policy{MinRedirectBytes: p.MinRedirectBytes, RegionPreference: p.RegionPreference,
		ForbidCrossRegionFills: p.ForbidCrossRegionFills}
	v.fleet = placement.NewFleet(v.targets, v.policy)
	v.copies = copySettings{off: p.DisableCrossRegionCopies, threshold: p.CrossRegionCopyThreshold,
		window: policyDuration(p.GetCrossRegionCopyWindow(), targets.DefaultCrossRegionCopyWindow)}
	if v.copies.threshold == 0 {
		v.copies.threshold = targets.DefaultCrossRegionCopyThreshold
	}
	v.admission = admissionSettings{minOccurrences: p.MinOccurrences,
		window: policyDuration(p.GetAdmissionWindow(), targets.DefaultAdmissionWindow)}
	if v.admission.minOccurrences == 0 {
		v.admission.minOccurrences = targets.DefaultMinOccurrences
	}
	d.view.Store(v)
	return v
}

func stateOf(s pb.TargetState) placement.State {
	switch s {
	case pb.TargetState_TARGET_STATE_DRAINING:
		return placement.Draining
	case pb.TargetState_TARGET_STATE_DISABLED:
		return placement.Disabled
	}
	return placement.Active
}

// writeCtx bounds an etcd write.
func (d *deps) writeCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, d.cfg.WriteTimeout)
}

func (s *Service) wrote(rev int64) {
	for {
		cur := s.lastWrite.Load()
		if rev <= cur || s.lastWrite.CompareAndSwap(cur, rev) {
			return
		}
	}
}

// readSnapshot returns a snapshot that includes this replica's writes, waiting up to a second for
// the watch to deliver them; past that (etcd down) it answers from what it has.
func (s *Service) readSnapshot(ctx context.Context) *targets.Snapshot {
	return s.awaitRevision(ctx, s.lastWrite.Load(), time.Second)
}

// settled records a write and waits, up to applyWait or half the caller's remaining time, until
// this replica's snapshot includes it. Admin writes return only then, so a Place on the same
// replica after they return sees them: a purge that has returned is redirected to no more. Other
// replicas follow within one watch round trip. (Fill reports do not wait: see ReportFill.)
func (s *Service) settled(ctx context.Context, rev int64) {
	s.wrote(rev)
	// At most half of the caller's remaining time: the write has succeeded, and its answer must
	// reach the caller before the deadline turns it into a failure.
	wait := applyWait
	if dl, ok := ctx.Deadline(); ok {
		wait = min(wait, time.Until(dl)/2)
	}
	if snap := s.awaitRevision(ctx, rev, wait); snap.Revision < rev {
		s.cfg.Log.Warn("a write is committed but this replica's snapshot has not caught up with it; placement here answers from the older state until the watch delivers it",
			"revision", rev, "snapshot_revision", snap.Revision, "waited", wait)
	}
}

// applyWait bounds how long a write waits for the watch to deliver it before returning.
const applyWait = 5 * time.Second

func (s *Service) awaitRevision(ctx context.Context, want int64, max time.Duration) *targets.Snapshot {
	deadline := time.NewTimer(max)
	defer deadline.Stop()
	for {
		snap := s.w.Snapshot()
		if snap.Revision >= want {
			return snap
		}
		select {
		case <-snap.Superseded():
		case <-deadline.C:
			return snap
		case <-ctx.Done():
			return snap
		}
	}
}

func policyDuration(d interface{ AsDuration() time.Duration }, def time.Duration) time.Duration {
	if v := d.AsDuration(); v > 0 {
		return v
	}
	return def
}
