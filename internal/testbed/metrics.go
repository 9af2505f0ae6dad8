package testbed

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// MetricSum sums the counters and gauges of metric name that g gathers, over the series whose
// labels include every one of labels (none: every series).
func MetricSum(t testing.TB, g prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	series:
		for _, m := range f.GetMetric() {
			for k, v := range labels {
				found := false
				for _, l := range m.GetLabel() {
					found = found || (l.GetName() == k && l.GetValue() == v)
				}
				if !found {
					continue series
				}
			}
			n += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return n
}

// Label is the label set {name: value}, or none when name is "".
func Label(name, value string) map[string]string {
	if name == "" {
		return nil
	}
	return map[string]string{name: value}
}
