package targets

import (
	"context"
	"errors"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// elect campaigns for the janitor election under r's prefix in a session of its own and returns
// the fence of its term and the session.
func elect(t *testing.T, cli *clientv3.Client, r *Registry, id string) (Fence, *concurrency.Session) {
	t.Helper()
	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(5))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sess.Close() })
	e := concurrency.NewElection(sess, r.Prefix()+"election/janitor")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.Campaign(ctx, id); err != nil {
		t.Fatal(err)
	}
	return Fence{Key: e.Key(), Revision: e.Rev()}, sess
}

// A janitor that has been deposed (its session's lease gone, another replica elected) writes
// nothing through its fenced registry, whatever the write: each is refused with ErrNotElected and
// etcd's revision does not move. The elected janitor's writes go through.
func TestDeposedJanitorsWritesAreRefused(t *testing.T) {
	// Serial: it checks that etcd's revision does not move, which parallel tests would move.
	cli := sharedEtcd(t)
	ctx := context.Background()
	r := NewRegistry(cli, testPrefix(t))
	key := testKey(1)
	obj := testRecord(key, "t", "u", "b", 10, time.Now(), time.Hour)
	if err := r.PutObject(ctx, obj); err != nil {
		t.Fatal(err)
	}
	got, err := cli.Get(ctx, r.objectKey(key, "t"))
	if err != nil {
		t.Fatal(err)
	}
	objRev := got.Kvs[0].ModRevision
	if ok, err := r.Claim(ctx, &pb.FillClaim{Key: testKey(2), Target: "t", Token: "tok"}, time.Minute); err != nil || !ok {
		t.Fatalf("claim: %v %v", ok, err)
	}
	_, claimRev, err := r.HeldClaim(ctx, testKey(2), "tok")
	if err != nil {
		t.Fatal(err)
	}

	fenceA, sessA := elect(t, cli, r, "a")
	a := r.Fenced(fenceA)
	health := &pb.TargetHealth{Target: "t", TargetUid: "u", Healthy: true}
	if err := a.SetHealth(ctx, health); err != nil {
		t.Fatalf("the elected janitor's health write: %v", err)
	}
	// Deposed: its session's lease ends (as when it expires while the replica is partitioned) and
	// another replica wins, while replica a has not noticed.
	if _, err := cli.Revoke(ctx, sessA.Lease()); err != nil {
		t.Fatal(err)
	}
	fenceB, _ := elect(t, cli, r, "b")
	b := r.Fenced(fenceB)

	before, err := cli.Get(ctx, "any")
	if err != nil {
		t.Fatal(err)
	}
	writes := []struct {
		name  string
		write func(*Registry) error
	}{
		{"SetHealth", func(r *Registry) error {
			return r.SetHealth(ctx, &pb.TargetHealth{Target: "t", TargetUid: "u", Reason: "deposed verdict"})
		}},
		{"Retire", func(r *Registry) error {
			_, err := r.Retire(ctx, []Retirement{{Key: key, Target: "t", ModRevision: objRev, Garbage: GarbageOf(obj, "expired", time.Now())}})
			return err
		}},
		{"Extend", func(r *Registry) error {
			_, err := r.Extend(ctx, []Extension{{Object: obj, ModRevision: objRev}})
			return err
		}},
		{"QueueGarbage", func(r *Registry) error { return r.QueueGarbage(ctx, &pb.GarbageObject{Bucket: "b", ObjectName: "x"}) }},
		{"GarbageDone", func(r *Registry) error { return r.GarbageDone(ctx, []string{"x"}) }},
		{"Claim", func(r *Registry) error {
			_, err := r.Claim(ctx, &pb.FillClaim{Key: testKey(3), Target: "t", Token: "copier"}, time.Minute)
			return err
		}},
		{"CompleteFill", func(r *Registry) error {
			_, err := r.CompleteFill(ctx, testRecord(testKey(2), "t", "u", "b", 10, time.Now(), time.Hour), claimRev)
			return err
		}},
		{"ReleaseClaim", func(r *Registry) error { return r.ReleaseClaim(ctx, testKey(2), claimRev, nil) }},
		{"CopyRequestsDone", func(r *Registry) error {
			return r.CopyRequestsDone(ctx, []CopyEntry{{ID: "eu/" + key, ModRevision: 0}})
		}},
	}
	for _, w := range writes {
		if err := w.write(a); !errors.Is(err, ErrNotElected) {
			t.Errorf("%s by the deposed janitor: %v, want ErrNotElected", w.name, err)
		}
	}
	// What is not a registry write (etcd's compaction) asks Held first.
	if _, err := a.Held(ctx); !errors.Is(err, ErrNotElected) {
		t.Errorf("Held by the deposed janitor: %v, want ErrNotElected", err)
	}
	if rev, err := b.Held(ctx); err != nil || rev != before.Header.Revision {
		t.Errorf("Held by the elected janitor: revision %d, %v; want %d", rev, err, before.Header.Revision)
	}
	after, err := cli.Get(ctx, "any")
	if err != nil {
		t.Fatal(err)
	}
	if after.Header.Revision != before.Header.Revision {
		t.Fatalf("the deposed janitor's writes moved etcd from revision %d to %d", before.Header.Revision, after.Header.Revision)
	}
	stored, err := cli.Get(ctx, r.healthKey("t"))
	if err != nil || len(stored.Kvs) != 1 {
		t.Fatalf("health record: %v", err)
	}
	// The newly elected janitor writes.
	if err := b.SetHealth(ctx, health); err != nil {
		t.Fatalf("the new janitor's health write: %v", err)
	}
	if _, err := b.Retire(ctx, []Retirement{{Key: key, Target: "t", ModRevision: objRev}}); err != nil {
		t.Fatalf("the new janitor's retirement: %v", err)
	}
}
