package chaos

import (
	"fmt"
	"testing"
	"time"
)

// resumeBound is how soon after a restarted control plane reports SERVING the agent redirects
// again: its gate probes every 100ms and gRPC reconnects with a backoff capped at 1s.
const resumeBound = time.Second

// A control plane killed with SIGKILL under load: every client is answered inline, with the
// origin's bytes, while it is down; once it is restarted and serving, redirects resume within a
// second.
func TestControlPlaneKilledAndRestarted(t *testing.T) {
	r := newRig(t, rigOptions{})
	ks := r.newKeyspace("kill", 64, 0, 32<<10)
	r.warm(ks)
	l := r.startLoad(ks, loadOptions{clients: pick(8, 32)})
	time.Sleep(pick(time.Second, 5*time.Second))
	r.cps[0].Kill()
	killed := l.now()
	time.Sleep(pick(time.Second, 5*time.Second))
	r.cps[0].Restart()
	r.cps[0].WaitServing(t, 30*time.Second)
	serving := l.now()
	time.Sleep(pick(1500*time.Millisecond, 5*time.Second))
	f := l.finish()
	if rec, ok := f.firstRedirectAfter(serving); ok {
		f.recovery = rec
	}
	f.extra = fmt.Sprintf("down %s", (serving - killed).Round(time.Millisecond))
	f.report(t, "controlplane-kill", false)
	if f.recovery < 0 || f.recovery > resumeBound {
		t.Fatalf("redirects resumed %s after the restarted control plane was serving (bound %s)", f.recovery, resumeBound)
	}
}

// A control plane frozen with SIGSTOP: its connection stays open and nothing answers. With
// --place-timeout 50ms no client waits longer than the timeout plus 50ms for its answer; a request
// over the bound is excused only by a stall of this process that overlaps it and covers the excess
// (measured and reported, so that a loaded machine does not pass for a slow agent).
func TestControlPlaneFrozen(t *testing.T) {
	const placeTimeout = 50 * time.Millisecond
	const bound = placeTimeout + 50*time.Millisecond
	r := newRig(t, rigOptions{})
	ks := r.newKeyspace("freeze", 64, 0, 32<<10)
	// Fill with the rig's generous place timeout (fill claims need their etcd write), then serve
	// with the default one, which is what this scenario bounds.
	r.warm(ks)
	r.replaceAgent("--place-timeout", placeTimeout.String())
	r.warm(ks)
	// Paced clients: the bound is about the agent, not about queueing behind our own load on a
	// small machine.
	l := r.startLoad(ks, loadOptions{clients: pick(8, 16), pause: 5 * time.Millisecond})
	time.Sleep(pick(time.Second, 3*time.Second))
	r.cps[0].Freeze()
	frozen := l.now()
	time.Sleep(pick(3*time.Second, 10*time.Second))
	r.cps[0].Thaw()
	thawed := l.now()
	time.Sleep(pick(1500*time.Millisecond, 5*time.Second))
	f := l.finish()
	if rec, ok := f.firstRedirectAfter(thawed); ok {
		f.recovery = rec
	}
	during := func(rc record) bool { return rc.start >= frozen && rc.start < thawed }
	p99, mx := f.latency(0.99, during)
	over, excused := 0, 0
	var worstExcess time.Duration
	for _, rc := range f.recs {
		if !during(rc) || rc.end-rc.start <= bound {
			continue
		}
		over++
		stalled := f.stalls.within(l.t0.Add(rc.start), l.t0.Add(rc.end))
		if rc.end-rc.start-stalled <= bound {
			excused++
		} else {
			worstExcess = max(worstExcess, rc.end-rc.start-stalled-bound)
		}
	}
	f.extra = fmt.Sprintf("frozen: p99 %s max %s, over %s: %d (%d excused by measured stalls)",
		p99.Round(100*time.Microsecond), mx.Round(100*time.Microsecond), bound, over, excused)
	f.report(t, "controlplane-freeze", false)
	if over > excused {
		t.Fatalf("%d answers during the freeze took longer than --place-timeout+50ms = %s without a stall of this process to explain it (worst by %s)",
			over-excused, bound, worstExcess)
	}
	if f.recovery < 0 {
		t.Fatal("no redirect after the control plane was thawed")
	}
}

// Two control-plane replicas behind the agent's client-side balancing (--controlplane a,b), one
// killed under load: no client notices, and redirects go on through the other replica.
func TestOneOfTwoControlPlanesKilled(t *testing.T) {
	r := newRig(t, rigOptions{controlPlanes: 2})
	ks := r.newKeyspace("replicas", 64, 0, 32<<10)
	r.warm(ks)
	l := r.startLoad(ks, loadOptions{clients: pick(8, 32)})
	time.Sleep(pick(time.Second, 5*time.Second))
	r.cps[1].Kill()
	killed := l.now()
	time.Sleep(pick(2*time.Second, 10*time.Second))
	end := l.now()
	f := l.finish()
	gap := f.longestRedirectGap(killed, end)
	f.recovery = gap
	after := func(rc record) bool { return rc.start >= killed }
	f.extra = fmt.Sprintf("after the kill: %d requests, %.1f%% redirected, longest time without a redirect %s",
		f.count(after), 100*float64(f.count(func(rc record) bool { return after(rc) && rc.redirected }))/float64(max(1, f.count(after))),
		gap.Round(time.Millisecond))
	f.report(t, "controlplane-1-of-2", false)
	if gap > resumeBound {
		t.Fatalf("with one of two replicas up, %s passed without a redirect (bound %s)", gap, resumeBound)
	}
}
