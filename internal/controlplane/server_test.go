package controlplane

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/etcdembed"
	"github.com/detourhq/detour/internal/testbed"
)

// serverGoroutines lists the goroutines running code of this package or of the registry, other
// than tests' own (a replica's handlers, loops and watchers: none may outlive its Shutdown).
func serverGoroutines() []string {
	var out []string
	for _, g := range strings.Split(allStacks(), "\n\n") {
		if strings.Contains(g, "testing.tRunner") || strings.Contains(g, "delayAnswers") {
			continue
		}
		if strings.Contains(g, "detour/internal/controlplane.") || strings.Contains(g, "detour/internal/targets.") {
			out = append(out, g)
		}
	}
	return out
}

// allStacks is every goroutine's stack, however many there are (a fixed buffer cuts the dump, and
// what it cut would look absent).
func allStacks() string {
	for buf := make([]byte, 8<<20); ; buf = make([]byte, 2*len(buf)) {
		if n := runtime.Stack(buf, true); n < len(buf) {
			return string(buf[:n])
		}
	}
}

// noServerGoroutines fails the test if a goroutine of a replica is still running. Tests that call
// it do not call t.Parallel: Go runs them before the parallel tests start, and they would count
// those tests' replicas.
func noServerGoroutines(t *testing.T) {
	t.Helper()
	// A goroutine that has just delivered its last result may still be on its way out (seen in
	// CI: the test's own Serve goroutine in runtime.goexit): a second to be gone.
	left := serverGoroutines()
	for deadline := time.Now().Add(time.Second); len(left) > 0 && time.Now().Before(deadline); left = serverGoroutines() {
		time.Sleep(20 * time.Millisecond)
	}
	if len(left) > 0 {
		t.Fatalf("%d goroutines outlived Shutdown, the first:\n%s", len(left), left[0])
	}
}

func healthOf(t *testing.T, r *replica, service string) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	h, err := healthpb.NewHealthClient(r.op).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		t.Fatal(err)
	}
	return h.Status
}

// A replica serves before its snapshot is loaded, whatever holds the load up (here etcd is not
// there yet): health says NOT_SERVING, Place answers inline at once with reason "loading", the
// Admin API and WatchTargets say they are loading; once etcd answers and the snapshot is loaded,
// everything serves. Nothing makes it exit meanwhile.
func TestServesWhileTheSnapshotLoads(t *testing.T) {
	t.Parallel()
	url, err := etcdembed.FreeURL()
	if err != nil {
		t.Fatal(err)
	}
	r := serveReplica(t, Options{EtcdEndpoints: []string{url}, WriteTimeout: time.Second})
	ctx := context.Background()
	eventually(t, 10*time.Second, "health answers", func() bool {
		hctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		h, err := healthpb.NewHealthClient(r.op).Check(hctx, &healthpb.HealthCheckRequest{})
		return err == nil && h.Status == healthpb.HealthCheckResponse_NOT_SERVING
	})
	if got := healthOf(t, r, LivenessService); got != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("liveness %v while loading: a probe would kill the replica", got)
	}
	start := time.Now()
	resp, err := r.place.Place(ctx, &pb.PlaceRequest{Key: key(1), AcceptedTargets: []string{"us-a"}, AgentRegion: "us"})
	if err != nil || resp.Result != pb.PlaceResult_PLACE_RESULT_INLINE || resp.Reason != ReasonLoading || resp.Fill != nil {
		t.Fatalf("Place while loading: %v %v", resp, err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Place while loading took %s", d)
	}
	_, err = r.admin.ListTargets(ctx, &pb.ListTargetsRequest{})
	if code(err) != codes.Unavailable || !strings.Contains(err.Error(), "loading the snapshot (0 records so far)") {
		t.Fatalf("an admin read while loading: %v", err)
	}
	if _, err := r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: target(t, "us-a", "us")}); code(err) != codes.Unavailable ||
		!strings.Contains(err.Error(), "loading the snapshot") {
		t.Fatalf("an admin write while loading: %v", err)
	}
	stream, err := r.place.WatchTargets(ctx, &pb.WatchTargetsRequest{AgentRegion: "us"})
	if err == nil {
		_, err = stream.Recv()
	}
	if code(err) != codes.Unavailable {
		t.Fatalf("WatchTargets while loading: %v", err)
	}
	if got := metric(t, r, "detour_snapshot_loading"); got != 1 {
		t.Fatalf("detour_snapshot_loading %v while loading", got)
	}

	etcd, err := etcdembed.Start(ctx, etcdembed.Config{Dir: t.TempDir(), ClientURL: url, PKIDir: etcdPKI(t).Dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(etcd.Close)
	select {
	case <-r.srv.Ready():
	case err := <-r.served:
		t.Fatalf("Serve: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("no snapshot within 60s of etcd starting")
	}
	if got := healthOf(t, r, ""); got != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health %v once loaded", got)
	}
	createTargets(t, r, target(t, "us-a", "us"))
	if resp, err := r.place.Place(ctx, &pb.PlaceRequest{Key: key(1), AcceptedTargets: []string{"us-a"}, AgentRegion: "us"}); err != nil ||
		resp.Reason == ReasonLoading {
		t.Fatalf("Place once loaded: %v %v", resp, err)
	}
	if got := metric(t, r, "detour_snapshot_loading"); got != 0 {
		t.Fatalf("detour_snapshot_loading %v once loaded", got)
	}
}

// Shutdown ends WatchTargets streams (agents reconnect elsewhere) instead of waiting for its
// deadline, returns nil, makes Serve return ErrServerClosed, and leaves no goroutine of the
// replica running. Serve after Shutdown refuses at once; a second Shutdown returns nil.
func TestShutdownDrainsAndStopsEverything(t *testing.T) {
	r := startReplica(t)
	createTargets(t, r, target(t, "us-a", "us"))
	fill(t, r, key(1), []string{"us-a"}, "us")
	ctx := context.Background()
	stream, err := r.place.WatchTargets(ctx, &pb.WatchTargetsRequest{AgentRegion: "us"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	start := time.Now()
	if err := r.srv.Shutdown(sctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Shutdown took %s: an open stream held it", d)
	}
	if err := <-r.served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve returned %v, want ErrServerClosed", err)
	}
	r.down = true
	for {
		if _, err := stream.Recv(); err != nil {
			if code(err) != codes.Unavailable {
				t.Fatalf("the open stream ended with %v, want Unavailable", err)
			}
			break
		}
	}
	noServerGoroutines(t)
	if err := r.srv.Shutdown(ctx); err != nil {
		t.Fatalf("a second Shutdown: %v", err)
	}
	if err := r.srv.Serve(Listeners{Placement: r.ls.Placement}); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Shutdown: %v", err)
	}
}

// A Shutdown whose deadline passes while an RPC is still running cuts it, says so (the context's
// error), and still leaves nothing running. The RPC is a write to an etcd that has gone away.
func TestShutdownCutShortReturnsTheContextsError(t *testing.T) {
	etcd := startEtcd(t)
	r := startReplicaWith(t, Options{EtcdEndpoints: []string{etcd.Endpoint()}, WriteTimeout: 30 * time.Second})
	etcd.Crash()
	ctx := context.Background()
	done := make(chan error, 1)
	go func() {
		_, err := r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: target(t, "us-a", "us")})
		done <- err
	}()
	eventually(t, 10*time.Second, "the write in flight", func() bool {
		select {
		case err := <-done:
			t.Fatalf("the write to a crashed etcd returned before the shutdown: %v", err)
		default:
		}
		return strings.Contains(allStacks(), "(*Service).CreateTarget")
	})
	sctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := r.srv.Shutdown(sctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown cut short returned %v, want the context's error", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Shutdown took %s past its 300ms deadline", d)
	}
	if err := <-done; err == nil {
		t.Fatal("the cut write succeeded")
	}
	if err := <-r.served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve returned %v, want ErrServerClosed", err)
	}
	r.down = true
	noServerGoroutines(t)
}

// A listener that fails for good stops Serve, which stops everything else and returns its error
// (with the admin listener apart, three servers share the failure path); Shutdown then releases
// the rest.
func TestAFailedListenerStopsServe(t *testing.T) {
	r := startReplicaWith(t, Options{AdminListen: testbed.FreeAddr(t)})
	r.ls.Admin.Close()
	var err error
	select {
	case err = <-r.served:
	case <-time.After(10 * time.Second):
		t.Fatal("Serve goes on without its admin listener")
	}
	if err == nil || errors.Is(err, ErrServerClosed) || !strings.Contains(err.Error(), "admin") {
		t.Fatalf("Serve returned %v, want the admin listener's failure", err)
	}
	r.down = true
	if err := r.srv.Shutdown(context.Background()); err != nil {
		t.Fatalf("Shutdown after a failure: %v", err)
	}
	noServerGoroutines(t)
}

// A janitor whose election key is gone stands down (its fenced writes would be refused anyway)
// and campaigns again: a new key, created after the deleted one, holds the election.
func TestJanitorStandsDownWhenItsElectionIsLost(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	cli, err := clientv3.New(sharedEtcdConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx := context.Background()
	election := testPrefix(t) + "election/janitor/"
	var held int64
	eventually(t, 10*time.Second, "a janitor elected", func() bool {
		resp, err := cli.Get(ctx, election, clientv3.WithPrefix())
		if err != nil || len(resp.Kvs) != 1 {
			return false
		}
		held = resp.Kvs[0].CreateRevision
		return metric(t, r, "detour_janitor_elected") == 1
	})
	if _, err := cli.Delete(ctx, election, clientv3.WithPrefix()); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "a new term", func() bool {
		resp, err := cli.Get(ctx, election, clientv3.WithPrefix())
		return err == nil && len(resp.Kvs) == 1 && resp.Kvs[0].CreateRevision > held &&
			metric(t, r, "detour_janitor_elected") == 1
	})
	// The new term works: a target is probed and found healthy.
	createTargets(t, r, target(t, "us-a", "us"))
}

// The load's progress line says how far it is and when it should end at its rate so far.
func TestLoadProgressSaysWhenTheLoadEnds(t *testing.T) {
	for _, c := range []struct {
		n, expected int64
		elapsed     time.Duration
		want        string
	}{
		{0, 0, 5 * time.Second, "[records 0 expected 0 elapsed 5s]"},
		{250_000, 1_000_000, 5 * time.Second, "[records 250000 expected 1000000 elapsed 5s rate_per_second 50000 expected_end_in 15s]"},
		{1_000_000, 1_000_000, 20 * time.Second, "[records 1000000 expected 1000000 elapsed 20s rate_per_second 50000]"},
	} {
		if got := fmt.Sprint(loadProgressArgs(c.n, c.expected, c.elapsed)); got != c.want {
			t.Errorf("loadProgressArgs(%d, %d, %s) = %s, want %s", c.n, c.expected, c.elapsed, got, c.want)
		}
	}
}
