package targets

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// writeInHomes writes READY copies of keys from..to-1 with r (its default encoding: records that
// name their homes), spread over targets, buckets, name prefixes and media types, and returns them
// by key/target as a replica must serve them.
func writeInHomes(t *testing.T, r *Registry, from, to int, buckets ...string) map[string]*pb.StoredObject {
	t.Helper()
	now := time.Now()
	out := map[string]*pb.StoredObject{}
	for i := from; i < to; i++ {
		target := []string{"a", "b", "c"}[i%3]
		o := testRecord(testKey(i), target, "uid-"+target, buckets[i%len(buckets)], uint64(i), now.Add(time.Duration(i)), 0)
		if i%4 == 0 {
			o.ObjectName = "hg/objects/" + o.Key
		}
		if i%5 == 0 {
			o.MediaType = "application/mercurial-0.2"
		}
		if i%7 == 0 {
			o.Transient, o.Expires = true, timestamppb.New(now.Add(time.Hour))
		}
		if err := r.PutObject(context.Background(), o); err != nil {
			t.Fatal(err)
		}
		out[o.Key+"/"+o.Target] = o
	}
	return out
}

// servesExactly fails the test unless snap holds the copies of want, every field as written.
func servesExactly(t *testing.T, what string, snap *Snapshot, want map[string]*pb.StoredObject) {
	t.Helper()
	got := allCopies(snap)
	if len(got) != len(want) {
		t.Fatalf("%s: %d copies, %d written", what, len(got), len(want))
	}
	for k, o := range want {
		if !proto.Equal(got[k], o) {
			t.Fatalf("%s: copy %s is\n%v\nwritten\n%v", what, k, got[k], o)
		}
	}
}

func homeKeys(t *testing.T, cli *clientv3.Client) map[string]string {
	t.Helper()
	resp, err := cli.Get(context.Background(), DefaultPrefix+"homes/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, kv := range resp.Kvs {
		out[string(kv.Key)] = string(kv.Value)
	}
	return out
}

// Records that name their home are served with that home, every field as the fill wrote it, by
// every way a replica comes to hold them: a watch (a home first named while it watches included),
// a resume from a checkpoint and etcd's history since, a ranged read (streamed, by pages, in
// process) and a copy of etcd's database. The registry reads them back as written.
func TestRecordsNamingAHomeServeItsHomeOnEveryPath(t *testing.T) {
	srv, cli := startEtcd(t)
	ctx := context.Background()
	r := NewRegistry(cli, "")
	want := writeInHomes(t, r, 0, 300, "b1", "b2")
	seen := map[string]bool{} // one home record per target, bucket, name prefix and media type
	for _, o := range want {
		seen[o.TargetUid+"|"+o.Bucket+"|"+o.ObjectName[:len(o.ObjectName)-len(o.Key)]+"|"+o.MediaType] = true
	}
	if n := len(homeKeys(t, cli)); n != len(seen) || n < 10 {
		t.Fatalf("%d home records for %d homes", n, len(seen))
	}
	cp := filepath.Join(t.TempDir(), "cp")
	watching := NewWatcher(cli, "", nil)
	watching.Checkpoint(cp)
	run(t, watching)
	servesExactly(t, "first load", watching.Snapshot(), want)
	if _, err := watching.WriteCheckpoint(); err != nil {
		t.Fatal(err)
	}
	// After the checkpoint, and while the replica watches: a bucket no record has named yet.
	for k, o := range writeInHomes(t, r, 300, 420, "b3", "b1") {
		want[k] = o
	}
	eventually(t, 10*time.Second, "the later writes reach the watching replica", func() bool {
		return watching.Snapshot().ObjectCount() == len(want)
	})
	servesExactly(t, "watch", watching.Snapshot(), want)

	resumed := NewWatcher(cli, "", nil)
	resumed.Checkpoint(cp)
	if _, err := resumed.resume(ctx); err != nil {
		t.Fatal(err)
	}
	servesExactly(t, "resume", resumed.Snapshot(), want)
	for _, mode := range []readMode{streamed, paged, local} {
		w := watcherReading(srv, cli, mode, 50)
		if _, err := w.load(ctx); err != nil {
			t.Fatal(err)
		}
		servesExactly(t, mode.String(), w.Snapshot(), want)
	}
	copied := copyLoader(cli, "", t.TempDir(), nil)
	if _, err := copied.load(ctx); err != nil {
		t.Fatal(err)
	}
	if n, _ := copied.DatabaseCopies(); n != 1 {
		t.Fatalf("%d loads from a copy", n)
	}
	servesExactly(t, "copy", copied.Snapshot(), want)

	for _, i := range []int{0, 4, 5, 7, 301, 419} {
		objs, _, err := r.ReadObjects(ctx, testKey(i))
		if err != nil || len(objs) != 1 || !proto.Equal(objs[0], want[objs[0].Key+"/"+objs[0].Target]) {
			t.Fatalf("read key %d back: %v, %v", i, objs, err)
		}
	}
}

// A home deleted or edited behind Detour's back: the records that name it are not served by a
// replica that reads them after that (rather than served somewhere else), and the next write that
// names the home puts it back as it was, for every record that names it.
func TestAHomeChangedBehindDetoursBackIsNotServedAndComesBack(t *testing.T) {
	_, cli := startEtcd(t)
	ctx := context.Background()
	r := NewRegistry(cli, "")
	want := writeInHomes(t, r, 0, 60, "b1")
	homes := homeKeys(t, cli)
	watching := watch(t, cli, "")
	servesExactly(t, "before", watching.Snapshot(), want)

	// Delete one home, and give another the value of a third (what a stray edit might do).
	var keys []string
	for k := range homes {
		keys = append(keys, k)
	}
	deleted, edited, third := keys[0], keys[1], keys[2]
	if _, err := cli.Delete(ctx, deleted); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, edited, homes[third]); err != nil {
		t.Fatal(err)
	}
	loaded := NewWatcher(cli, "", nil)
	if _, err := loaded.load(ctx); err != nil {
		t.Fatal(err)
	}
	lost := 0
	for k, o := range want {
		_, h := encodeRecord(o, EncodingHomeRef)
		hk := DefaultPrefix + "homes/" + h.ref.String()
		got := loaded.Snapshot().Copies(mustKey(t, o.Key))
		if hk == deleted || hk == edited {
			lost++
			if len(got) != 0 {
				t.Fatalf("copy %s, whose home was %s behind Detour's back, is served: %v", k, map[bool]string{true: "deleted", false: "edited"}[hk == deleted], got[0].Proto(mustKey(t, o.Key)))
			}
		} else if len(got) != 1 || !proto.Equal(got[0].Proto(mustKey(t, o.Key)), o) {
			t.Fatalf("copy %s, whose home is untouched, is %v", k, got)
		}
	}
	if lost == 0 || lost == len(want) {
		t.Fatalf("%d of %d copies lost their home: the test proves nothing", lost, len(want))
	}
	// The replica that resolved them before keeps serving them where they are.
	servesExactly(t, "the watching replica", watching.Snapshot(), want)
	// A purge removes a record whose home is gone (queueing no bytes it cannot locate), and the
	// copies at other targets with it.
	for k, o := range want {
		if _, h := encodeRecord(o, EncodingHomeRef); DefaultPrefix+"homes/"+h.ref.String() != deleted {
			continue
		}
		if n, _, err := r.DeleteObjects(ctx, o.Key, "test", time.Now()); err != nil || n != 1 {
			t.Fatalf("purge of %s, whose home is gone: %d removed, %v", k, n, err)
		}
		if held, err := r.HoldsRecord(ctx, o.Key, o.Target); err != nil || held {
			t.Fatalf("after the purge etcd still holds %s: %v", k, err)
		}
		if garbage, err := r.ListGarbage(ctx, 100); err != nil || len(garbage) != 0 {
			t.Fatalf("a purge of a record whose home is gone queued %d bytes to delete: %v", len(garbage), err)
		}
		break
	}

	// Writing the copies again (a fill of each, say) puts every home back.
	want = writeInHomes(t, r, 0, 60, "b1")
	if got := homeKeys(t, cli); len(got) != len(homes) || got[deleted] != homes[deleted] || got[edited] != homes[edited] {
		t.Fatalf("home records after the next writes: %d of %d, deleted one back: %v, edited one mended: %v", len(got), len(homes),
			got[deleted] == homes[deleted], got[edited] == homes[edited])
	}
	again := NewWatcher(cli, "", nil)
	if _, err := again.load(ctx); err != nil {
		t.Fatal(err)
	}
	servesExactly(t, "a load after the homes came back", again.Snapshot(), want)
	eventually(t, 10*time.Second, "the new writes reach the watching replica", func() bool {
		c := watching.Snapshot().Copies(mustKey(t, testKey(59)))
		return len(c) == 1 && c[0].Created == want[testKey(59)+"/"+"c"].Created.AsTime().UnixNano()
	})
	servesExactly(t, "the watching replica after the homes came back", watching.Snapshot(), want)
}

// Many records of one home in one transaction write the home once: etcd refuses a transaction
// that puts one key twice.
func TestABatchOfOneHomeWritesItOnce(t *testing.T) {
	_, cli := startEtcd(t)
	ctx := context.Background()
	r := NewRegistry(cli, "")
	written := writeInHomes(t, r, 0, 90, "b1")
	var xs []Extension
	for _, o := range written {
		objs, revs, err := r.ReadObjects(ctx, o.Key)
		if err != nil || len(objs) != 1 {
			t.Fatalf("read %s: %v, %v", o.Key, objs, err)
		}
		objs[0].Expires = timestamppb.New(time.Now().Add(48 * time.Hour))
		xs = append(xs, Extension{Object: objs[0], ModRevision: revs[0]})
	}
	n, err := r.Extend(ctx, xs)
	if err != nil || n != len(xs) {
		t.Fatalf("extended %d of %d: %v", n, len(xs), err)
	}
	w := NewWatcher(cli, "", nil)
	if _, err := w.load(ctx); err != nil {
		t.Fatal(err)
	}
	for _, x := range xs {
		got := w.Snapshot().Copies(mustKey(t, x.Object.Key))
		if len(got) != 1 || !proto.Equal(got[0].Proto(mustKey(t, x.Object.Key)), x.Object) {
			t.Fatalf("after the extension: %v, want %v", got, x.Object)
		}
	}
}
