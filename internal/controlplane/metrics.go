package controlplane

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/detourhq/detour/internal/targets"
)

// Metrics are the control plane's Prometheus metrics, on a registry of their own so that several
// replicas can live in one process (tests, the dev stack).
type Metrics struct {
	Registry      *prometheus.Registry
	decisions     *prometheus.CounterVec
	latency       prometheus.Histogram
	fills         *prometheus.CounterVec
	rpcs          *prometheus.CounterVec
	verify        *prometheus.HistogramVec
	extended      prometheus.Counter
	retired       *prometheus.CounterVec
	garbage       *prometheus.CounterVec
	probes        *prometheus.CounterVec
	reconcile     *prometheus.CounterVec
	missing       *prometheus.CounterVec
	retireRefused *prometheus.CounterVec
	broken        *prometheus.CounterVec
	janitor       prometheus.Gauge
	rejections    *prometheus.CounterVec
	invalidations *prometheus.CounterVec
	// Regions: redirects by locality, cross-region fills, copies made by the store.
	redirects        *prometheus.CounterVec
	crossRegionFills *prometheus.CounterVec
	copyRequests     *prometheus.CounterVec
	copies           *prometheus.CounterVec
	copyDuration     *prometheus.HistogramVec
	soleCopies       *prometheus.GaugeVec
	// Lifecycle: rounds of the periodic loops, how WatchTargets streams start.
	rounds      *prometheus.CounterVec
	watchStarts *prometheus.CounterVec
}

func newMetrics(w *targets.Watcher) *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "detour_place_decisions_total", Help: "Placement decisions by result and reason."},
			[]string{"result", "reason"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "detour_place_duration_seconds", Help: "Time to answer Place.",
			Buckets: prometheus.ExponentialBuckets(25e-6, 2, 14)}),
		fills: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "detour_fill_reports_total", Help: "Fill reports and aborts by outcome."},
			[]string{"outcome"}),
		rpcs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "detour_grpc_requests_total", Help: "gRPC requests by method and status code."},
			[]string{"method", "code"}),
	}
	m.verify = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "detour_fill_verify_duration_seconds",
		Help:    "Time to verify a reported fill against the store, by whether the bytes were re-read (full).",
		Buckets: prometheus.ExponentialBuckets(1e-3, 2, 14)}, []string{"full"})
	m.extended = prometheus.NewCounter(prometheus.CounterOpts{Name: "detour_objects_extended_total",
		Help: "Object expiries extended because the objects were redirected to."})
	m.retired = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_objects_retired_total",
		Help: "Object records removed by the janitor, by reason (expired, target_deleted, store_moved, missing, broken)."}, []string{"reason"})
	m.garbage = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_garbage_deletions_total",
		Help: "Deletions of stored bytes whose records are gone, by outcome (deleted, failed)."}, []string{"outcome"})
	m.probes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_target_probes_total",
		Help: "Probes of targets' client-facing URLs, by target and result (ok, failed)."}, []string{"target", "result"})
	m.reconcile = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_reconcile_objects_total",
		Help: "Objects the reconciler looked at, by target and outcome (checked, orphan_deleted, orphan_kept_recorded: not in the index but recorded in etcd, in a format this release cannot read or since the snapshot)."}, []string{"target", "outcome"})
	m.missing = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_reconcile_missing_objects_total",
		Help: "Index records whose stored object the reconciler found missing or replaced (removed)."}, []string{"target"})
	m.retireRefused = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_reconcile_refused_total",
		Help: "Rounds whose listing of a target's bucket missed more of its records than --reconcile-max-retire-share allows, which retired none, by target and path (reconcile: the janitor's; confirm: a replica's after its start)."},
		[]string{"target", "path"})
	m.broken = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_broken_location_reports_total",
		Help: "Agents' reports of locations that did not serve their object, by outcome (removed, intact)."}, []string{"outcome"})
	m.janitor = prometheus.NewGauge(prometheus.GaugeOpts{Name: "detour_janitor_elected",
		Help: "1 while this replica is the elected janitor (prober, sweeper, reconciler)."})
	m.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.rejections = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_auth_rejections_total",
		Help: "RPCs refused for who sent them, by reason: no_client_certificate (Unauthenticated), policy, not_claim_holder and foreign_agent_id (PermissionDenied), tls_handshake (a certificate the client CA did not issue)."}, []string{"reason"})
	m.invalidations = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_invalidations_sent_total",
		Help: "Invalidations of cached redirects sent to agents (sent: records; flush: a stream told to drop everything)."}, []string{"kind"})
	m.Registry.MustRegister(m.rejections, m.invalidations)
	m.redirects = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_redirects_total",
		Help: "Redirects answered, by whether the target is in the agent's region (in_region, cross_region, unknown_region: the agent named none)."},
		[]string{"locality"})
	m.crossRegionFills = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_cross_region_fills_total",
		Help: "Fills granted at a target outside the agent's region because the agent's region had no fillable target, by the target's region."},
		[]string{"target_region"})
	m.copyRequests = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_copy_requests_total",
		Help: "Keys this replica found redirected across regions past the policy's threshold, by outcome (pending, dropped, queued, already_queued, failed)."},
		[]string{"outcome"})
	m.copies = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_store_copies_total",
		Help: "Server-side copies the janitor attempted, by reason (cross_region, drain) and outcome (ready, busy, failed, unverified)."},
		[]string{"reason", "outcome"})
	m.copyDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "detour_store_copy_duration_seconds",
		Help: "Time from claim to READY record of a server-side copy, by reason.", Buckets: prometheus.ExponentialBuckets(1e-3, 2, 16)},
		[]string{"reason"})
	m.soleCopies = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "detour_drain_sole_copies",
		Help: "Copies at a draining target whose key has no copy at an active target (0: the drain is complete); set by the elected janitor."},
		[]string{"target"})
	m.rounds = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_loop_rounds_total",
		Help: "Completed rounds of the periodic loops: the elected janitor's (probe, sweep, reconcile, copy) and every replica's (extend, copy_requests). A loop whose count stops moving is stuck."},
		[]string{"loop"})
	m.watchStarts = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_watch_streams_total",
		Help: "WatchTargets streams by how they started: resumed from the agent's revision (its cached redirects kept) or full (a target set that ends them)."},
		[]string{"start"})
	m.Registry.MustRegister(m.rounds, m.watchStarts,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_snapshot_loading",
			Help: "1 while this replica loads its first snapshot (health NOT_SERVING, Place answers inline, the Admin API is unavailable), else 0."},
			func() float64 {
				select {
				case <-w.Ready():
					return 0
				default:
					return 1
				}
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_snapshot_provisional",
			Help: "1 while this replica serves the index of its last clean stop as its embedded etcd restarts (redirects only: no fills, the Admin API is unavailable), else 0."},
			func() float64 {
				if w.Snapshot().Provisional() {
					return 1
				}
				return 0
			}))
	m.Registry.MustRegister(m.redirects, m.crossRegionFills, m.copyRequests, m.copies, m.copyDuration, m.soleCopies)
	m.Registry.MustRegister(m.janitor, m.verify, m.extended, m.retired, m.garbage, m.probes, m.reconcile, m.missing, m.retireRefused, m.broken,
		targetHealthCollector{w})
	m.Registry.MustRegister(m.decisions, m.latency, m.fills, m.rpcs,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_snapshot_revision", Help: "etcd revision of the current snapshot."},
			func() float64 { return float64(w.Snapshot().Revision) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_snapshot_age_seconds",
			Help: "Time since etcd last confirmed the snapshot current (a change or a progress notification, asked for every 5s): staleness."},
			func() float64 { return time.Since(w.Confirmed()).Seconds() }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_snapshot_objects", Help: "READY copies in the index."},
			func() float64 { return float64(w.Snapshot().ObjectCount()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_snapshot_targets", Help: "Registered targets."},
			func() float64 { return float64(len(w.Snapshot().Targets())) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_checkpoint_revision",
			Help: "etcd revision of the last checkpoint this replica wrote (0: none yet); behind detour_snapshot_revision by at most --checkpoint-interval of writes."},
			func() float64 { return float64(w.CheckpointStats().Revision) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_checkpoint_bytes", Help: "Size of the last checkpoint this replica wrote."},
			func() float64 { return float64(w.CheckpointStats().Bytes) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "detour_checkpoint_write_failures_total",
			Help: "Checkpoint writes that failed (the next start may read every record from etcd)."},
			func() float64 { return float64(w.CheckpointStats().Failures) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "detour_checkpoint_set_aside_total",
			Help: "Checkpoints a start could not use (damaged, of another etcd, compacted past …) and read every record from etcd instead."},
			func() float64 { return float64(w.CheckpointStats().SetAside) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "detour_etcd_database_copies_loaded_total",
			Help: "Loads of every record (a first start, a checkpoint set aside, a watch that lost its history) that read a copy of the external etcd's database (--etcd-copy-max-bytes)."},
			func() float64 { n, _ := w.DatabaseCopies(); return float64(n) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "detour_etcd_database_copies_declined_total",
			Help: "Loads that were to read a copy of etcd's database and read by range instead (too large, no room, refused, damaged, stalled: the log says which)."},
			func() float64 { _, n := w.DatabaseCopies(); return float64(n) }),
	)
	return m
}

// unary counts every unary RPC by method and code.
func (m *Metrics) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	resp, err := h(ctx, req)
	m.rpcs.WithLabelValues(info.FullMethod, status.Code(err).String()).Inc()
	return resp, err
}

func (m *Metrics) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	err := h(srv, ss)
	m.rpcs.WithLabelValues(info.FullMethod, status.Code(err).String()).Inc()
	return err
}

var targetHealthyDesc = prometheus.NewDesc("detour_target_healthy",
	"1 if the target is healthy (heartbeat alive and its client-facing URL passes the probe), else 0.", []string{"target"}, nil)

// targetHealthCollector reports every target's health from the current snapshot.
type targetHealthCollector struct{ w *targets.Watcher }

func (c targetHealthCollector) Describe(ch chan<- *prometheus.Desc) { ch <- targetHealthyDesc }

func (c targetHealthCollector) Collect(ch chan<- prometheus.Metric) {
	for _, t := range c.w.Snapshot().Targets() {
		v := 0.0
		if t.Healthy {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(targetHealthyDesc, prometheus.GaugeValue, v, t.Name)
	}
}
