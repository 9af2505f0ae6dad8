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

// A start with the embedded etcd and no clean stop to serve (its marker gone, as after a crash,
// and a checkpoint older than etcd's state) serves redirects from a walk of etcd's database file
// while etcd restarts (held back here): what etcd holds, including a copy filled after the
// checkpoint, but not a copy whose bytes were deleted while no replica ran (each record is checked
// against the store before its first redirect), and no fill is granted meanwhile. Once etcd is up
// the replica is ready and no longer provisional. With --early-walk=false the same start waits
// for etcd and resumes from the checkpoint.
func TestAStartWithoutACleanStopServesEtcdsFileWhileEtcdRestarts(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cp := filepath.Join(dir, "index.checkpoint")
	o := Options{WriteTimeout: time.Second, DataDir: dir, Checkpoint: cp, CheckpointInterval: -1}
	a := startReplicaWith(t, o)
	place, acc := stopWithCopies(t, a, 2)
	old, err := os.ReadFile(cp)
	if err != nil {
		t.Fatal(err)
	}
	// Another run fills key 2, and dies: its checkpoint and marker are not left (the first run's
	// checkpoint is put back).
	b := startReplicaWith(t, o)
	fill(t, b, key(2), acc, "us")
	eventually(t, 5*time.Second, "a redirect to key 2", func() bool { return place(b, key(2)).Result == pb.PlaceResult_PLACE_RESULT_REDIRECT })
	gone := listed(t, b, key(1))
	b.shutdown(t)
	if err := os.Remove(filepath.Join(dir, "etcd.clean-stop")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cp, old, 0o600); err != nil {
		t.Fatal(err)
	}
	// While no replica runs, key 1's bytes are deleted behind Detour's back: its record is in
	// etcd's file, and the walk serves it, but no redirect may name it.
	if gone == nil {
		t.Fatal("key 1 is not listed")
	}
	if err := sharedEnv(t).store.Delete(context.Background(), gone.Bucket, gone.ObjectName, 0); err != nil {
		t.Fatal(err)
	}

	release := make(chan struct{})
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()
	o.etcdStarting = func(ctx context.Context) {
		select {
		case <-release:
		case <-ctx.Done():
		}
	}
	var log logBuffer
	o.Log = log.logger()
	c := serveReplica(t, o)
	eventually(t, 10*time.Second, "a redirect before etcd is up", func() bool {
		return place(c, key(0)).Result == pb.PlaceResult_PLACE_RESULT_REDIRECT
	})
	if got := place(c, key(2)); got.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatalf("key 2 before etcd is up: %v", got)
	}
	if got := place(c, key(1)); got.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatalf("key 1, its bytes deleted while no replica ran, is redirected to before etcd is up: %v", got)
	}
	if got := place(c, key(5)); got.Result != pb.PlaceResult_PLACE_RESULT_INLINE || got.Reason != ReasonLoading || got.Fill != nil {
		t.Fatalf("a miss before etcd is up: %v", got)
	}
	if _, err := c.admin.ListTargets(context.Background(), &pb.ListTargetsRequest{}); code(err) != codes.Unavailable {
		t.Fatalf("an admin read before etcd is up: %v", err)
	}
	if got := healthOf(t, c, ""); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("health %v before etcd is up", got)
	}
	if got := metric(t, c, "detour_snapshot_provisional"); got != 1 {
		t.Fatalf("detour_snapshot_provisional %v before etcd is up", got)
	}
	if !strings.Contains(log.String(), "serving the index in the embedded etcd's database file") {
		t.Fatalf("the start did not say it serves etcd's file:\n%s", log.String())
	}
	if _, err := os.Stat(filepath.Join(dir, "etcd-db.start-copy")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the walked copy is left in the data directory: %v", err)
	}

	close(release)
	released = true
	select {
	case <-c.srv.Ready():
	case err := <-c.served:
		t.Fatalf("Serve: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatalf("not ready within 30s of etcd starting:\n%s", log.String())
	}
	if got := metric(t, c, "detour_snapshot_provisional"); got != 0 {
		t.Fatalf("detour_snapshot_provisional %v once etcd is up", got)
	}
	if !strings.Contains(log.String(), "snapshot resumed from the embedded etcd's database file") {
		t.Fatalf("the first load did not resume from the walk:\n%s", log.String())
	}
	fill(t, c, key(5), acc, "us")
	eventually(t, 5*time.Second, "a redirect to a fill granted once etcd is up", func() bool {
		return place(c, key(5)).Result == pb.PlaceResult_PLACE_RESULT_REDIRECT
	})
	c.shutdown(t)

	// Turned off: the start waits for etcd (the replica is built once etcd is up) and resumes
	// from the checkpoint; nothing is copied.
	if err := os.Remove(filepath.Join(dir, "etcd.clean-stop")); err != nil {
		t.Fatal(err)
	}
	// (A copy an earlier start left, killed before it walked it, is removed by any start.)
	stale := filepath.Join(dir, "etcd-db.start-copy")
	if err := os.WriteFile(stale, []byte("left by a killed start"), 0o600); err != nil {
		t.Fatal(err)
	}
	o.NoEarlyWalk, o.etcdStarting = true, nil
	var offLog logBuffer
	o.Log = offLog.logger()
	d := startReplicaWith(t, o)
	if _, err := os.Stat(stale); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a start left an earlier start's copy: %v", err)
	}
	if got := place(d, key(2)); got.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatalf("key 2 with the walk turned off: %v", got)
	}
	if l := offLog.String(); strings.Contains(l, "database file") || !strings.Contains(l, "snapshot resumed from the checkpoint") {
		t.Fatalf("with the walk turned off the start read etcd's file, or did not resume from the checkpoint:\n%s", l)
	}
}

// A walk of etcd's file that lacked events etcd had committed (here: the file of an earlier stop
// put in place of the copy, with a copy retired since, its bytes queued for deletion an hour ago)
// may have redirected to the retired copy before etcd was up. Its bytes are not deleted at once
// once the replica is ready, as the queue entry's age alone would allow, but a grace later.
func TestGarbageWaitsAGraceAfterAWalkThatWasBehind(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	janitor := fastJanitor
	janitor.GarbageGrace = 2 * time.Second
	o := Options{WriteTimeout: time.Second, DataDir: dir, Janitor: janitor}
	a := startReplicaWith(t, o)
	_, acc := stopWithCopies(t, a, 1)
	old := filepath.Join(t.TempDir(), "old.db")
	if _, err := targets.CopyMemberDatabase(filepath.Join(dir, "etcd", "member", "snap", "db"), old); err != nil {
		t.Fatal(err)
	}

	// A run without store access (it deletes nothing) retires key 0, queued an hour ago.
	noStore := o
	noStore.GCSEndpoint = "http://127.0.0.1:1"
	b := startReplicaWith(t, noStore)
	obj := listed(t, b, key(0))
	if obj == nil {
		t.Fatal("key 0 is not listed")
	}
	cli, err := clientv3.New(b.srv.EmbeddedEtcd().ClientConfig())
	if err != nil {
		t.Fatal(err)
	}
	n, _, err := targets.NewRegistry(cli, testPrefix(t)).DeleteObjects(context.Background(), key(0), "test", time.Now().Add(-time.Hour))
	cli.Close()
	if err != nil || n != 1 {
		t.Fatalf("retire key 0: %d, %v", n, err)
	}
	b.shutdown(t)
	_ = os.Remove(filepath.Join(dir, "etcd.clean-stop"))

	o.memberCopied = func(path string) {
		if err := os.Rename(old, path); err != nil {
			t.Error(err)
		}
	}
	var log logBuffer
	o.Log = log.logger()
	c := startReplicaWith(t, o)
	ready := time.Now()
	if !strings.Contains(log.String(), "lacked events") {
		t.Fatalf("the resume did not find the walk behind etcd:\n%s", log.String())
	}
	if got := placeKey(t, c, key(0), acc...); got.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatalf("key 0, retired, is redirected to once etcd is up: %v", got)
	}
	exists := func() bool {
		_, err := sharedEnv(t).gcs.Object(obj.Bucket, obj.ObjectName)
		return err == nil
	}
	for time.Since(ready) < time.Second {
		if !exists() {
			t.Fatalf("the retired copy's bytes were deleted %s after the replica was ready, within the grace", time.Since(ready))
		}
		time.Sleep(50 * time.Millisecond)
	}
	eventually(t, 10*time.Second, "the retired copy's bytes deleted after the grace", func() bool { return !exists() })
}

// A replica built and shut down without serving (a failed listen, a signal during the build)
// leaves no copy of etcd's file behind: it is as large as etcd's database.
func TestAReplicaNeverServedLeavesNoCopy(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	stopWithCopies(t, startReplicaWith(t, Options{WriteTimeout: time.Second, DataDir: dir}), 1)
	_ = os.Remove(filepath.Join(dir, "etcd.clean-stop"))
	o := Options{WriteTimeout: time.Second, DataDir: dir, GCSEndpoint: sharedEnv(t).gcs.Endpoint(), Insecure: true,
		EtcdPrefix: testPrefix(t), Log: quiet}
	copied := ""
	o.memberCopied = func(path string) { copied = path }
	srv, err := New(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(copied); copied == "" || err != nil {
		t.Fatalf("no copy of etcd's file after New (%q): %v", copied, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(copied); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a replica shut down before it served left its copy: %v", err)
	}
}
