package targets

import (
	"context"
	"testing"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Agent records reach the snapshot (and a reload) without moving TargetsRevision: the fleet view
// judges agents' lag against the target set, which their own reports must not change.
func TestAgentRecordsLeaveTheTargetSetAlone(t *testing.T) {
	t.Parallel()
	cli, prefix := sharedEtcd(t), testPrefix(t)
	r := NewRegistry(cli, prefix)
	ctx := context.Background()
	w := watch(t, cli, prefix)
	targetsRev := w.Snapshot().TargetsRevision
	id := "spiffe://detour/agent/a/b"
	if _, err := r.PutAgent(ctx, &pb.Agent{Id: id, Region: "us", AppliedRevision: 3, Lagging: true}, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the agent in the snapshot", func() bool { return len(w.Snapshot().Agents()) == 1 })
	got := w.Snapshot()
	if a := got.Agents()[0]; a.Id != id || a.AppliedRevision != 3 || a.Lagging {
		t.Fatalf("agent record %v (computed fields must not be stored)", a)
	}
	if got.TargetsRevision != targetsRev || got.Revision <= targetsRev {
		t.Fatalf("an agent record moved TargetsRevision %d → %d", targetsRev, got.TargetsRevision)
	}
	if a := watch(t, cli, prefix).Snapshot().Agents(); len(a) != 1 || a[0].Id != id {
		t.Fatalf("a fresh load: %v", a)
	}
	if _, err := r.PutAgent(ctx, &pb.Agent{}, 10*time.Second); err == nil {
		t.Fatal("an agent without an id was recorded")
	}
}
