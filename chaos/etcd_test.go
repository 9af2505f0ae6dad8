package chaos

import (
	"fmt"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/testbed"
)

// A three-member etcd loses its leader (crashed: no leadership transfer) while clients ask for
// stored keys (Place) and new ones (fills: claim, upload, ReportFill, all etcd writes): no client
// notices, and fills complete again once a new leader is elected (recovery: the longest time after
// the crash without a fill READY).
func TestEtcdLeaderLostUnderPlaceAndFillLoad(t *testing.T) {
	r := newRig(t, rigOptions{etcdMembers: 3, controlPlanes: 2})
	ks := r.newKeyspace("etcd", 64, pick(1500, 10000), 16<<10)
	r.warm(ks)
	ready := func() float64 {
		return testbed.Metric(t, r.agent.MetricsURL, "detour_agent_fills_total", `outcome="ready"`)
	}
	l := r.startLoad(ks, loadOptions{clients: pick(8, 16), freshEvery: 4})
	time.Sleep(pick(time.Second, 5*time.Second))
	leader := -1
	for i, m := range r.etcd {
		if m.IsLeader() {
			leader = i
		}
	}
	if leader < 0 {
		t.Fatal("no etcd member is the leader")
	}
	r.etcd[leader].Crash()
	killed := l.now()
	// The fill outage: the longest time after the crash in which no fill became READY, sampled
	// every 20ms until the load ends.
	var outage time.Duration
	sampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		last, lastAt := ready(), killed
		for {
			select {
			case <-sampling:
				outage = max(outage, l.now()-lastAt)
				return
			case <-time.After(20 * time.Millisecond):
			}
			if v := ready(); v > last {
				outage = max(outage, l.now()-lastAt)
				last, lastAt = v, l.now()
			}
		}
	}()
	// The surviving members elect a leader.
	testbed.Eventually(t, 20*time.Second, "a new etcd leader", func() bool {
		for i, m := range r.etcd {
			if i != leader && m.IsLeader() {
				return true
			}
		}
		return false
	})
	elected := l.now() - killed
	time.Sleep(pick(1500*time.Millisecond, 5*time.Second))
	readyBefore := ready()
	time.Sleep(time.Second)
	readyLater := ready()
	close(sampling)
	<-sampled
	f := l.finish()
	f.recovery = outage
	fails := testbed.Metric(t, r.agent.MetricsURL, "detour_agent_fills_total", `outcome="report_failed"`) +
		testbed.Metric(t, r.agent.MetricsURL, "detour_agent_fills_total", `outcome="upload_failed"`)
	f.extra = fmt.Sprintf("fresh keys %d, fills ready %.0f, failed %.0f, new leader seen after %s; recovery: longest time without a fill READY after the crash",
		f.count(func(rc record) bool { return rc.fresh }), readyLater, fails, elected.Round(time.Millisecond))
	f.report(t, "etcd-leader-loss", false)
	if readyLater <= readyBefore {
		t.Fatal("fills stopped completing after the new leader was elected")
	}
}
