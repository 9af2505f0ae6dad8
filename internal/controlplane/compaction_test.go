package controlplane

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/etcdembed"
)

// startEtcdWithQuota is startEtcd with a backend space quota of its own.
func startEtcdWithQuota(t *testing.T, quota int64) (*etcdembed.Server, *clientv3.Client) {
	t.Helper()
	srv, err := etcdembed.Start(context.Background(), etcdembed.Config{Dir: t.TempDir(), PKIDir: etcdPKI(t).Dir, QuotaBytes: quota})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	cli, err := clientv3.New(srv.ClientConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return srv, cli
}

// logBuffer collects a replica's log lines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *logBuffer) logger() *slog.Logger { return slog.New(slog.NewTextHandler(b, nil)) }

// overwrite writes count values in transactions of 64 puts over n keys outside Detour's prefix,
// each key in turn (history that only compaction removes), stopping at the first error, which it
// returns with the bytes written. Small values in shared transactions, as Detour writes: large
// ones would need runs of free pages that a compacted database may not have.
func overwrite(ctx context.Context, cli *clientv3.Client, n, count int, value string) (int64, error) {
	return overwriteAt(ctx, cli, n, count, value, 0)
}

// overwriteAt is overwrite at no more than rate bytes per second (0: as fast as etcd takes them).
func overwriteAt(ctx context.Context, cli *clientv3.Client, n, count int, value string, rate float64) (int64, error) {
	var written int64
	start := time.Now()
	for i := 0; i < count; i += 64 {
		if rate > 0 {
			time.Sleep(time.Until(start.Add(time.Duration(float64(written) / rate * float64(time.Second)))))
		}
		ops := make([]clientv3.Op, 0, 64)
		for j := i; j < min(i+64, count); j++ {
			ops = append(ops, clientv3.OpPut(fmt.Sprintf("/soak/%d", j%n), value))
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			return written, err
		}
		written += int64(len(ops) * len(value))
	}
	return written, nil
}

// The elected janitor compacts etcd's history (to the revision it saw one interval earlier), so
// writing five times the space quota's worth of history leaves etcd healthy: no NOSPACE alarm, the
// database file stays under the quota, Detour's own writes keep working, and the replica's watch
// is never cut off by a compaction (a watcher within an interval of the head is kept).
func TestCompactionKeepsEtcdUnderItsQuota(t *testing.T) {
	const quota = 16 << 20
	etcd, cli := startEtcdWithQuota(t, quota)
	var logs logBuffer
	// An interval well above etcd's 100ms resynchronisation of new watches, as the default 5m is.
	r := startReplicaWith(t, Options{EtcdEndpoints: []string{etcd.Endpoint()}, WriteTimeout: 5 * time.Second, Log: logs.logger(),
		Etcd: EtcdMaintenance{CompactInterval: 250 * time.Millisecond, StatusInterval: 100 * time.Millisecond}})
	ctx := context.Background()
	value := strings.Repeat("x", 1024)
	// Five times the quota (twice under the race detector, which makes etcd write at 1-2 MiB/s).
	times := 5
	if raceEnabled {
		times = 2
	}
	total := times * quota / len(value)
	start := time.Now()
	var maxSize int64
	var written int64
	for round := 0; written < int64(times*quota); round++ {
		// A fixed rate, so that the history one interval holds does not depend on the machine.
		n, err := overwriteAt(ctx, cli, 256, total/20, value, 8<<20)
		written += n
		if err != nil {
			t.Fatalf("after %d MiB of history: %v", written>>20, err)
		}
		// Detour's own writes work throughout, and this replica's reads see them (they wait for
		// its watch to deliver them).
		setPolicy(t, r, func(p *pb.Policy) { p.MinRedirectBytes = uint64(round) })
		if got, err := r.admin.GetPolicy(ctx, &pb.GetPolicyRequest{}); err != nil || got.Policy.MinRedirectBytes != uint64(round) {
			t.Fatalf("round %d: the policy read back is %v (%v)", round, got, err)
		}
		st, err := cli.Status(ctx, etcd.Endpoint())
		if err != nil {
			t.Fatal(err)
		}
		maxSize = max(maxSize, st.DbSize)
	}
	took := time.Since(start)
	if a := metric(t, r, "detour_etcd_alarm", `alarm="NOSPACE"`); a != 0 {
		t.Fatalf("NOSPACE alarm raised (%v)", a)
	}
	if maxSize >= quota {
		t.Fatalf("the database reached %d MiB, the quota is %d MiB", maxSize>>20, quota>>20)
	}
	if n := metric(t, r, "detour_etcd_compactions_total", `outcome="ok"`); n == 0 {
		t.Fatal("no compaction counted")
	}
	if strings.Contains(logs.String(), "etcd watch ended") {
		t.Fatalf("a compaction cut the replica's watch off:\n%s", logs.String())
	}
	t.Logf("%d MiB of history written in %s (%.0f MiB/s) against a %d MiB quota: database at most %d MiB, %v compactions",
		written>>20, took.Round(time.Millisecond), float64(written>>20)/took.Seconds(), quota>>20, maxSize>>20,
		metric(t, r, "detour_etcd_compactions_total", `outcome="ok"`))
}

// fillToNoSpace writes history until etcd refuses a write for its space quota.
func fillToNoSpace(t *testing.T, cli *clientv3.Client, quota int) {
	t.Helper()
	_, err := overwrite(context.Background(), cli, 256, 4*quota/1024, strings.Repeat("y", 1024))
	if !errors.Is(err, rpctypes.ErrNoSpace) {
		t.Fatalf("writing four times the quota: %v, want NOSPACE", err)
	}
}

// With compaction off, etcd reaches its quota and raises NOSPACE: Admin writes fail with
// ResourceExhausted and a message that names the alarm and the way out, the alarm is a metric
// and one log line, and Place keeps answering (inline, without fills). The recovery that
// docs/deploy.md gives (compact, defragment, disarm) makes writes work again and clears the
// metric.
func TestNoSpaceIsReportedAndTheDocumentedRecoveryWorks(t *testing.T) {
	const quota = 8 << 20
	etcd, cli := startEtcdWithQuota(t, quota)
	var logs logBuffer
	r := startReplicaWith(t, Options{EtcdEndpoints: []string{etcd.Endpoint()}, WriteTimeout: 5 * time.Second, Log: logs.logger(),
		Etcd: EtcdMaintenance{CompactInterval: -1, StatusInterval: 100 * time.Millisecond}})
	ctx := context.Background()
	createTargets(t, r, target(t, "us-a", "us"))
	fillToNoSpace(t, cli, quota)

	_, err := r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: target(t, "eu-a", "eu")})
	if code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "NOSPACE") || !strings.Contains(err.Error(), "docs/deploy.md") {
		t.Fatalf("an Admin write refused for space: %v", err)
	}
	eventually(t, 5*time.Second, "the NOSPACE alarm as a metric", func() bool {
		return metric(t, r, "detour_etcd_alarm", `alarm="NOSPACE"`) == 1
	})
	if n := strings.Count(logs.String(), "raised the NOSPACE alarm"); n != 1 {
		t.Fatalf("%d log lines name the alarm, want 1:\n%s", n, logs.String())
	}
	resp, err := r.place.Place(ctx, &pb.PlaceRequest{Key: key(1), Command: "manifestdata", AcceptedTargets: []string{"us-a"},
		AgentRegion: "us", AgentId: "a1"})
	if err != nil || resp.Fill != nil || resp.Result != pb.PlaceResult_PLACE_RESULT_INLINE {
		t.Fatalf("Place while etcd is out of space: %v %v", resp, err)
	}

	// The recovery of docs/deploy.md: etcdctl compact --physical <revision>, defrag, alarm disarm.
	st, err := cli.Status(ctx, etcd.Endpoint())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctx, st.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Defragment(ctx, etcd.Endpoint()); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.AlarmDisarm(ctx, &clientv3.AlarmMember{}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: target(t, "eu-a", "eu")}); err != nil {
		t.Fatalf("a write after the recovery: %v", err)
	}
	eventually(t, 5*time.Second, "the alarm metric cleared", func() bool {
		return metric(t, r, "detour_etcd_alarm", `alarm="NOSPACE"`) == 0
	})
	if !strings.Contains(logs.String(), "etcd alarm cleared") {
		t.Fatalf("no log line says the alarm cleared:\n%s", logs.String())
	}
}

// With the embedded etcd (Defrag set), the janitor recovers from NOSPACE by itself: it compacts
// all history, defragments and disarms, and writes work again within seconds; the replica's
// snapshot keeps following etcd.
func TestNoSpaceIsRecoveredAutomaticallyWhenDefragIsAllowed(t *testing.T) {
	const quota = 8 << 20
	etcd, cli := startEtcdWithQuota(t, quota)
	r := startReplicaWith(t, Options{EtcdEndpoints: []string{etcd.Endpoint()}, WriteTimeout: 5 * time.Second,
		Etcd: EtcdMaintenance{CompactInterval: time.Hour, StatusInterval: 100 * time.Millisecond, Defrag: true}})
	ctx := context.Background()
	createTargets(t, r, target(t, "us-a", "us"))
	fillToNoSpace(t, cli, quota)
	start := time.Now()
	eventually(t, 20*time.Second, "writes accepted again", func() bool {
		_, err := r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: target(t, "eu-a", "eu")})
		return err == nil || code(err) == codes.AlreadyExists
	})
	took := time.Since(start)
	if n := metric(t, r, "detour_etcd_nospace_recoveries_total", `outcome="disarmed"`); n < 1 {
		t.Fatalf("recoveries counted: %v", n)
	}
	eventually(t, 5*time.Second, "the alarm metric cleared", func() bool {
		return metric(t, r, "detour_etcd_alarm", `alarm="NOSPACE"`) == 0
	})
	st, err := cli.Status(ctx, etcd.Endpoint())
	if err != nil {
		t.Fatal(err)
	}
	if st.DbSize >= quota/2 {
		t.Fatalf("the database is %d MiB after the recovery (quota %d MiB)", st.DbSize>>20, quota>>20)
	}
	got, err := r.admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "eu-a"})
	if err != nil || got.Target.Name != "eu-a" {
		t.Fatalf("the snapshot after the recovery: %v %v", got, err)
	}
	t.Logf("writes accepted again %s after NOSPACE; database %d MiB", took.Round(time.Millisecond), st.DbSize>>20)
}
