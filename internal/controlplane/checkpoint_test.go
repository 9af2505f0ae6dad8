package controlplane

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

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
	createTargets(t, a, target(t, "us-a", "us"))
	setPolicy(t, a, func(p *pb.Policy) { p.MinOccurrences = 1 })
	acc := []string{"us-a"}
	place := func(r *replica, k string) *pb.PlaceResponse {
		t.Helper()
		resp, err := r.place.Place(ctx, &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: acc, AgentRegion: "us"})
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	for i := range 3 {
		fill(t, a, key(i), acc, "us")
		eventually(t, 5*time.Second, "a redirect", func() bool { return place(a, key(i)).Result == pb.PlaceResult_PLACE_RESULT_REDIRECT })
	}
	a.shutdown(t)
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
