package targets

import (
	"context"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

func TestInvalidationLogKeepsTheRecentAndSaysWhenItLostSome(t *testing.T) {
	l := newInvalidationLog(4)
	l.reset(10)
	if _, ok := l.since(9); ok {
		t.Fatal("changes before a reload were claimed complete")
	}
	for i := int64(11); i <= 14; i++ {
		l.add([]Invalidation{{Revision: i, Target: "t"}})
	}
	got, ok := l.since(12)
	if !ok || len(got) != 2 || got[0].Revision != 13 || got[1].Revision != 14 {
		t.Fatalf("since 12: %v %v", got, ok)
	}
	l.add([]Invalidation{{Revision: 15}, {Revision: 16}}) // overwrites 11 and 12
	if _, ok := l.since(11); ok {
		t.Fatal("a stream behind the ring was not told to flush")
	}
	if got, ok := l.since(12); !ok || len(got) != 4 || got[0].Revision != 13 {
		t.Fatalf("since 12 after wrapping: %v %v", got, ok)
	}
}

// Removing or replacing a READY record is an invalidation; storing a first copy is not.
func TestWatcherLogsRemovedAndReplacedRecords(t *testing.T) {
	t.Parallel()
	cli, prefix := sharedEtcd(t), testPrefix(t)
	r := NewRegistry(cli, prefix)
	w := watch(t, cli, prefix)
	ctx := context.Background()
	k := "00000000000000000000000000000000000000000000000000000000000000aa"
	obj := &pb.StoredObject{Key: k, Target: "t", State: pb.ObjectState_OBJECT_STATE_READY, Size: 1,
		Sha256: make([]byte, 32), Sha1: make([]byte, 20), Created: timestamppb.Now(), Bucket: "b", Generation: 1, ObjectName: "p/" + k}
	start := w.Snapshot().Revision
	if err := r.PutObject(ctx, obj); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the object indexed", func() bool { return len(w.Snapshot().Copies(mustParse(t, k))) == 1 })
	if xs, _ := w.InvalidationsSince(start); len(xs) != 0 {
		t.Fatalf("a first copy invalidated something: %v", xs)
	}
	obj.Generation = 2
	if err := r.PutObject(ctx, obj); err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.DeleteObjects(ctx, k, "test", time.Now()); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "both changes logged", func() bool {
		xs, ok := w.InvalidationsSince(start)
		return ok && len(xs) == 2 && xs[0].Target == "t" && xs[0].Key == mustParse(t, k) && xs[1].Revision > xs[0].Revision
	})
}

func mustParse(t *testing.T, s string) Key {
	k, ok := ParseKey(s)
	if !ok {
		t.Fatalf("bad key %q", s)
	}
	return k
}
