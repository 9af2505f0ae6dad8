package agent

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics are the agent's Prometheus metrics, on their own registry.
type Metrics struct {
	Registry        *prometheus.Registry
	requests        *prometheus.CounterVec
	placeFailures   *prometheus.CounterVec
	placeLatency    prometheus.Histogram
	fills           *prometheus.CounterVec
	inlineBytes     prometheus.Counter
	targetsRevision prometheus.Gauge
	locationChecks  *prometheus.CounterVec
	cpUp            prometheus.Gauge
	cache           *prometheus.CounterVec
	originChecks    *prometheus.CounterVec
	originHits      *prometheus.CounterVec
	offload         *offload
	// Resolved once: the redirect answer path counts without a label lookup.
	redirects, cacheHits, cacheMisses prometheus.Counter
}

func newMetrics() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_agent_requests_total",
			Help: "Requests by outcome: redirect, inline, inline_fill, passthrough, origin_denied, capabilities, protocol_error."}, []string{"outcome"}),
		placeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_agent_place_failures_total",
			Help: "Place calls that failed (by gRPC code) or were skipped while backing off."}, []string{"cause"}),
		placeLatency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "detour_agent_place_duration_seconds",
			Help: "Place round trips.", Buckets: prometheus.ExponentialBuckets(50e-6, 2, 12)}),
		fills: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_agent_fills_total",
			Help: "Fills by outcome: ready, aborted, upload_failed, report_failed; declined: a grant the agent released unstarted (budget full, store breaker open)."}, []string{"outcome"}),
		inlineBytes: prometheus.NewCounter(prometheus.CounterOpts{Name: "detour_agent_filled_inline_bytes_total",
			Help: "Response bytes written into fills (relayed inline to a client, or fetched for a fill no client waits for)."}),
		targetsRevision: prometheus.NewGauge(prometheus.GaugeOpts{Name: "detour_agent_targets_revision",
			Help: "Revision of the target set the agent advertises."}),
	}
	m.locationChecks = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_agent_location_checks_total",
		Help: "Sampled checks of handed-out locations, by result (ok, broken, skipped)."}, []string{"result"})
	m.originChecks = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_agent_origin_checks_total",
		Help: "Access checks sent to the origin before placing a request, by result (allowed, denied, error)."}, []string{"result"})
	m.originHits = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_agent_origin_check_hits_total",
		Help: "Access answers taken from the cache or from another request's check in flight, by result."}, []string{"result"})
	m.cpUp = prometheus.NewGauge(prometheus.GaugeOpts{Name: "detour_agent_controlplane_up",
		Help: "1 while the control plane answers Place; 0 while requests skip it (answered inline) until a probe succeeds."})
	m.cpUp.Set(1)
	m.cache = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_agent_location_cache_total",
		Help: "Location cache events: hit, miss, stored, invalidated (a record changed), flushed (target set changed or stream lost), evicted."}, []string{"result"})
	m.offload = newOffload()
	m.Registry.MustRegister(m.cache, m.offload.bytes)
	m.redirects, m.cacheHits, m.cacheMisses = m.requests.WithLabelValues("redirect"), m.cache.WithLabelValues("hit"), m.cache.WithLabelValues("miss")
	m.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), m.cpUp)
	m.Registry.MustRegister(m.locationChecks, m.requests, m.placeFailures, m.placeLatency, m.fills, m.inlineBytes, m.targetsRevision, m.originChecks, m.originHits)
	return m
}
