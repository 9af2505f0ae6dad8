package controlplane

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/targets"
)

// A replica that stops writes its checkpoint; the next one starts from it and from etcd's history
// since: a copy retired while no replica ran is not redirected to, one filled meanwhile is.
func TestARestartResumesFromTheCheckpointAndItsHistory(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "index.checkpoint")
	a := startReplicaWith(t, Options{WriteTimeout: time.Second, Checkpoint: path})
	ctx := context.Background()
	place, acc := stopWithCopies(t, a, 3)
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("no checkpoint after the replica stopped: %v", err)
	}

	// While no replica runs: key 0's copy is retired, straight in etcd.
	cli, err := clientv3.New(sharedEtcdConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if n, _, err := targets.NewRegistry(cli, testPrefix(t)).DeleteObjects(ctx, key(0), "test", time.Now()); err != nil || n != 1 {
		t.Fatalf("retire key 0: %d, %v", n, err)
	}

	var log logBuffer
	b := startReplicaWith(t, Options{WriteTimeout: time.Second, Checkpoint: path, Log: log.logger()})
	if !strings.Contains(log.String(), "snapshot resumed from the checkpoint") {
		t.Fatalf("the replica did not resume from the checkpoint:\n%s", log.String())
	}
	if got := place(b, key(0)); got.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatalf("key 0, retired while no replica ran, is redirected to: %v", got)
	}
	for i := 1; i < 3; i++ {
		if got := place(b, key(i)); got.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
			t.Fatalf("key %d: %v", i, got)
		}
	}
	fill(t, b, key(3), acc, "us")
	eventually(t, 5*time.Second, "a redirect to the new fill", func() bool { return place(b, key(3)).Result == pb.PlaceResult_PLACE_RESULT_REDIRECT })
}

// stopWithCopies fills keys 0..n-1 at one target through a, waits until each is redirected to and
// stops a: what the next start must serve. It returns how the tests ask Place, and the targets
// they accept.
func stopWithCopies(t *testing.T, a *replica, n int) (place func(*replica, string) *pb.PlaceResponse, acc []string) {
	t.Helper()
	createTargets(t, a, target(t, "us-a", "us"))
	setPolicy(t, a, func(p *pb.Policy) { p.MinOccurrences = 1 })
	acc = []string{"us-a"}
	place = func(r *replica, k string) *pb.PlaceResponse {
		t.Helper()
		resp, err := r.place.Place(context.Background(), &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: acc, AgentRegion: "us"})
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	for i := range n {
		fill(t, a, key(i), acc, "us")
		eventually(t, 5*time.Second, "a redirect", func() bool { return place(a, key(i)).Result == pb.PlaceResult_PLACE_RESULT_REDIRECT })
	}
	a.shutdown(t)
	return place, acc
}

// Checkpoints an operator cannot see fail are counted: a start that could not use the file (here a
// directory where the file should be) and every write that failed, until one succeeds; then the
// written checkpoint's revision and size.
func TestCheckpointFailuresAreCounted(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "index.checkpoint")
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	r := startReplicaWith(t, Options{WriteTimeout: time.Second, Checkpoint: path, CheckpointInterval: 50 * time.Millisecond})
	createTargets(t, r, target(t, "us-a", "us"))
	if got := metric(t, r, "detour_checkpoint_set_aside_total"); got != 1 {
		t.Fatalf("checkpoints set aside: %v, want 1 (a directory where the file should be)", got)
	}
	eventually(t, 5*time.Second, "failed writes counted", func() bool {
		return metric(t, r, "detour_checkpoint_write_failures_total") >= 2 && metric(t, r, "detour_checkpoint_revision") == 0
	})
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "a checkpoint written", func() bool {
		return metric(t, r, "detour_checkpoint_revision") >= float64(r.srv.w.Snapshot().Revision) &&
			metric(t, r, "detour_checkpoint_bytes") > 0
	})
}

// A replica on its embedded etcd that stops cleanly serves its redirects again at its next start
// while that etcd restarts (held back here until the test lets it go): the clean-stop marker is
// taken before etcd starts, a copy is redirected to, a miss is answered inline without a claim
// (no etcd to write it to), admin calls and health still say loading. Once etcd is up the replica
// serves as usual: fills are granted, and the copies are still redirected to.
func TestACleanStopIsServedWhileTheEmbeddedEtcdRestarts(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "index.checkpoint")
	var alog logBuffer
	o := Options{WriteTimeout: time.Second, DataDir: dir, Checkpoint: path, Log: alog.logger()}
	a := startReplicaWith(t, o)
	ctx := context.Background()
	place, acc := stopWithCopies(t, a, 2)
	marker := filepath.Join(dir, "etcd.clean-stop")
	if _, err := os.Stat(marker); err != nil {
		t.Fatalf("no clean-stop marker after a clean stop: %v\n%s", err, alog.String())
	}

	release := make(chan struct{})
	released := false
	o.etcdStarting = func(ctx context.Context) {
		select {
		case <-release:
		case <-ctx.Done():
		}
	}
	var log logBuffer
	o.Log = log.logger()
	b := serveReplica(t, o)
	defer func() {
		if !released {
			close(release)
		}
	}()
	if _, err := os.Stat(marker); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the marker is still there once the replica is built: %v", err)
	}
	eventually(t, 10*time.Second, "a redirect before etcd is up", func() bool {
		return place(b, key(0)).Result == pb.PlaceResult_PLACE_RESULT_REDIRECT
	})
	if got := place(b, key(1)); got.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatalf("key 1 before etcd is up: %v", got)
	}
	if got := place(b, key(5)); got.Result != pb.PlaceResult_PLACE_RESULT_INLINE || got.Reason != ReasonLoading || got.Fill != nil {
		t.Fatalf("a miss before etcd is up: %v", got)
	}
	if _, err := b.admin.ListTargets(ctx, &pb.ListTargetsRequest{}); code(err) != codes.Unavailable {
		t.Fatalf("an admin read before etcd is up: %v", err)
	}
	began := time.Now()
	if _, err := b.place.AbortFill(ctx, &pb.AbortFillRequest{Key: key(5)}); code(err) != codes.Unavailable || time.Since(began) > 500*time.Millisecond {
		t.Fatalf("a call that writes to etcd, before etcd is up: %v after %s", err, time.Since(began))
	}
	if got := healthOf(t, b, ""); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("health %v before etcd is up", got)
	}
	if got := metric(t, b, "detour_snapshot_provisional"); got != 1 {
		t.Fatalf("detour_snapshot_provisional %v before etcd is up", got)
	}
	select {
	case <-b.srv.Ready():
		t.Fatal("ready before etcd is up")
	default:
	}

	close(release)
	released = true
	select {
	case <-b.srv.Ready():
	case err := <-b.served:
		t.Fatalf("Serve: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatalf("not ready within 30s of etcd starting:\n%s", log.String())
	}
	if got := place(b, key(0)); got.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatalf("key 0 once etcd is up: %v", got)
	}
	if got := metric(t, b, "detour_snapshot_provisional"); got != 0 {
		t.Fatalf("detour_snapshot_provisional %v once etcd is up", got)
	}
	fill(t, b, key(5), acc, "us")
	eventually(t, 5*time.Second, "a redirect to a fill granted once etcd is up", func() bool {
		return place(b, key(5)).Result == pb.PlaceResult_PLACE_RESULT_REDIRECT
	})

	// A start without a checkpoint takes the marker too: a later start with the checkpoint must
	// not serve a stop that the run in between has made untrue.
	b.shutdown(t)
	if _, err := os.Stat(marker); err != nil {
		t.Fatalf("no marker after the second clean stop: %v", err)
	}
	noCheckpoint := o
	noCheckpoint.Checkpoint, noCheckpoint.etcdStarting = "", nil
	c := startReplicaWith(t, noCheckpoint)
	if _, err := os.Stat(marker); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a start without a checkpoint left the marker: %v", err)
	}
	c.shutdown(t)
	var dlog logBuffer
	o.etcdStarting, o.Log = nil, dlog.logger()
	startReplicaWith(t, o)
	if strings.Contains(dlog.String(), "serving the index of the last clean stop") {
		t.Fatalf("a start after a run without the checkpoint served the stop before it:\n%s", dlog.String())
	}
}

// A replica stopped while its embedded etcd still starts in the background (held back here; a
// restore at millions of keys takes tens of seconds and cannot be cut) returns at its deadline,
// says it was cut short, and writes no marker: nothing of that run was checked against etcd.
func TestShutdownDoesNotWaitForABackgroundEtcdStart(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	o := Options{WriteTimeout: time.Second, DataDir: dir, Checkpoint: filepath.Join(dir, "index.checkpoint")}
	stopWithCopies(t, startReplicaWith(t, o), 1)
	hold := make(chan struct{})
	o.etcdStarting = func(context.Context) { <-hold } // as etcd's restore: deaf to the context
	r := serveReplica(t, o)
	r.down = true // stopped here, not by the cleanup
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	began := time.Now()
	if err := r.srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown with etcd still starting: %v, want the deadline's error", err)
	}
	if d := time.Since(began); d > 2*time.Second {
		t.Fatalf("Shutdown took %s past a 300ms deadline", d)
	}
	if _, err := os.Stat(filepath.Join(dir, "etcd.clean-stop")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a stop before etcd was up left a marker: %v", err)
	}
	close(hold)
	if e := r.srv.EmbeddedEtcd(); e != nil { // the cancelled start ends without starting etcd
		t.Fatal("the embedded etcd started after Shutdown")
	}
}
