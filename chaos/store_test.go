package chaos

import (
	"fmt"
	"testing"
	"time"
)

// The store goes down (its API and its client-facing URL stop answering) and comes back, under a
// load of stored keys and new ones. The agent answers every request, with the origin's bytes:
// fills fail and are dropped, and once the control plane's prober has taken the target out, Place
// answers inline. A real client does not fall back from a location that fails, so redirects issued
// before the prober noticed fail at the store: the test counts them apart, and fails if any was
// issued later than the prober's detection time (ProbeFailures·ProbeInterval + ProbeTimeout). When
// the store is back, redirects resume.
func TestStoreDownAndBack(t *testing.T) {
	const probeInterval, probeFailures = 500 * time.Millisecond, 2
	const detection = probeFailures*probeInterval + probeInterval // the probe timeout defaults to the interval
	r := newRig(t, rigOptions{cpFlags: []string{"--probe-interval", probeInterval.String(),
		"--probe-failures", fmt.Sprint(probeFailures), "--probe-recoveries", "2"}})
	ks := r.newKeyspace("store", 64, pick(1000, 8000), 32<<10)
	r.warm(ks)
	l := r.startLoad(ks, loadOptions{clients: pick(8, 16), freshEvery: 4})
	time.Sleep(pick(time.Second, 5*time.Second))
	r.front.Unreachable()
	r.api.Unreachable()
	down := l.now()
	time.Sleep(pick(3*time.Second, 15*time.Second))
	r.front.Heal()
	r.api.Heal()
	healed := l.now()
	time.Sleep(pick(3*time.Second, 10*time.Second))
	f := l.finish()
	if rec, ok := f.firstRedirectAfter(healed); ok {
		f.recovery = rec
	}
	storeFailed := f.count(func(rc record) bool { return rc.fetchFail })
	var lastRedirect time.Duration // the last redirect issued during the outage, after its start
	for _, rc := range f.recs {
		if rc.start >= down && rc.start < healed && (rc.redirected || rc.fetchFail) {
			lastRedirect = max(lastRedirect, rc.start-down)
		}
	}
	share := func(from, to time.Duration) float64 {
		in := func(rc record) bool { return !rc.fresh && rc.start >= from && rc.start < to }
		return 100 * float64(f.count(func(rc record) bool { return in(rc) && rc.redirected })) / float64(max(1, f.count(in)))
	}
	f.extra = fmt.Sprintf("outage %s: locations that failed at the store %d (last redirect %s into the outage, detection bound %s); stored keys redirected before %.0f%%, after recovery %.0f%%",
		(healed - down).Round(time.Millisecond), storeFailed, lastRedirect.Round(time.Millisecond), detection,
		share(0, down), share(healed+f.recovery, l.now()))
	agentFailed := f.count(func(rc record) bool { return rc.failed && !rc.fetchFail })
	f.report(t, "store-down", true)
	if agentFailed > 0 {
		t.Fatalf("%d requests failed at the agent; first: %v", agentFailed, f.errs)
	}
	// One probe period of slack for the watch to reach the agent and requests already in Place.
	if lastRedirect > detection+probeInterval {
		t.Fatalf("a redirect was issued %s into the outage; the prober's detection time is %s", lastRedirect, detection)
	}
	if f.recovery < 0 {
		t.Fatal("no redirect after the store came back")
	}
}
