package chaos

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/testbed"
)

// etcd reaches its space quota under load (history written behind Detour's back, with Detour's
// own compaction off, as an etcd that nobody compacts): no client notices — stored keys are
// redirected from the snapshot, misses answered inline — while the control plane exports the
// NOSPACE alarm and refuses Admin writes with ResourceExhausted. The recovery docs/deploy.md gives
// (compact, defragment, disarm) brings fills back (recovery: from the disarm to the first fill
// READY).
func TestEtcdOutOfSpaceAndRecovered(t *testing.T) {
	const quota = 16 << 20
	r := newRig(t, rigOptions{etcdQuota: quota, cpFlags: []string{"--compact-interval", "-1s"}})
	// Enough fresh keys that some are left to fill after the recovery (each is asked once).
	ks := r.newKeyspace("space", 64, pick(1200, 20000), 16<<10)
	r.warm(ks)
	cli, err := clientv3.New(r.etcd[0].ClientConfig())
	r.must(err)
	defer cli.Close()
	cpMetrics := "http://" + r.cps[0].MetricsAddr + "/metrics"
	ready := func() float64 {
		return testbed.Metric(t, r.agent.MetricsURL, "detour_agent_fills_total", `outcome="ready"`)
	}
	ctx := context.Background()

	l := r.startLoad(ks, loadOptions{clients: pick(8, 16), freshEvery: 10, pause: 2 * time.Millisecond})
	time.Sleep(pick(time.Second, 5*time.Second))
	// History until etcd refuses a write: 64 small values a transaction, as Detour writes.
	value := strings.Repeat("h", 1024)
	var written int64
	for i := 0; ; i++ {
		ops := make([]clientv3.Op, 64)
		for j := range ops {
			ops[j] = clientv3.OpPut(fmt.Sprintf("/chaos-history/%d", (i*64+j)%512), value)
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			if !errors.Is(err, rpctypes.ErrNoSpace) {
				t.Fatalf("after %d MiB of history: %v", written>>20, err)
			}
			break
		}
		written += 64 * int64(len(value))
	}
	full := l.now()
	testbed.Eventually(t, 15*time.Second, "the control plane exports the NOSPACE alarm", func() bool {
		return testbed.Metric(t, cpMetrics, "detour_etcd_alarm", `alarm="NOSPACE"`) == 1
	})
	_, err = r.admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: &pb.Policy{MinOccurrences: 1}})
	if s, _ := status.FromError(err); s.Code() != codes.ResourceExhausted || !strings.Contains(s.Message(), "NOSPACE") {
		t.Fatalf("an Admin write while etcd is out of space: %v", err)
	}
	time.Sleep(pick(2*time.Second, 10*time.Second)) // clients keep being answered meanwhile

	// The recovery of docs/deploy.md.
	st, err := cli.Status(ctx, r.etcd[0].Endpoint())
	r.must(err)
	_, err = cli.Compact(ctx, st.Header.Revision, clientv3.WithCompactPhysical())
	r.must(err)
	_, err = cli.Defragment(ctx, r.etcd[0].Endpoint())
	r.must(err)
	_, err = cli.AlarmDisarm(ctx, &clientv3.AlarmMember{})
	r.must(err)
	disarmed := l.now()
	before := ready()
	var recovered time.Duration
	testbed.Eventually(t, 20*time.Second, "fills READY again after the recovery", func() bool {
		recovered = l.now() - disarmed
		return ready() > before
	})
	time.Sleep(pick(time.Second, 5*time.Second))
	f := l.finish()
	if int(ks.next.Load()) >= len(ks.fresh) {
		t.Fatal("the load ran out of fresh keys: fills after the recovery were not measured")
	}
	f.recovery = recovered
	during := func(rc record) bool { return rc.start >= full && rc.start < disarmed }
	f.extra = fmt.Sprintf("%d MiB of history to NOSPACE (quota %d MiB); while full: %d requests, %.1f%% redirected; recovery: disarm to the first fill READY",
		written>>20, quota>>20, f.count(during),
		100*float64(f.count(func(rc record) bool { return during(rc) && rc.redirected }))/float64(max(1, f.count(during))))
	f.report(t, "etcd-out-of-space", false)
	testbed.Eventually(t, 15*time.Second, "the alarm metric cleared", func() bool {
		return testbed.Metric(t, cpMetrics, "detour_etcd_alarm", `alarm="NOSPACE"`) == 0
	})
}
