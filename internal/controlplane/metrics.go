package controlplane

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/detourhq/detour/internal/targets"
)

// Metrics are the control plane's Prometheus metrics, on a registry of their own so that several
// replicas can live in one process (tests, the dev stack).
type Metrics struct {
	Registry  *prometheus.Registry
	decisions *prometheus.CounterVec
	latency   prometheus.Histogram
	fills     *prometheus.CounterVec
	rpcs      *prometheus.CounterVec
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
	m.Registry.MustRegister(m.decisions, m.latency, m.fills, m.rpcs,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_snapshot_revision", Help: "etcd revision of the current snapshot."},
			func() float64 { return float64(w.Snapshot().Revision) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_snapshot_age_seconds", Help: "Time since the current snapshot was made current."},
			func() float64 { return time.Since(w.Snapshot().Built).Seconds() }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_snapshot_objects", Help: "READY copies in the index."},
			func() float64 { return float64(w.Snapshot().ObjectCount()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_snapshot_targets", Help: "Registered targets."},
			func() float64 { return float64(len(w.Snapshot().Targets())) }),
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
