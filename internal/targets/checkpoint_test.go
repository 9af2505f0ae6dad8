package targets

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// allCopies is every copy in snap in its API form, by key and target.
func allCopies(snap *Snapshot) map[string]*pb.StoredObject {
	out := map[string]*pb.StoredObject{}
	snap.EachObject(func(k Key, o *Object) bool {
		out[k.String()+"/"+o.Target()] = o.Proto(k)
		return true
	})
	return out
}

// sameState fails the test unless a and b hold the same copies (every field), targets and policy.
func sameState(t *testing.T, what string, a, b *Snapshot) {
	t.Helper()
	ca, cb := allCopies(a), allCopies(b)
	if len(ca) != len(cb) {
		t.Fatalf("%s: %d copies, a full load %d", what, len(ca), len(cb))
	}
	for k, o := range ca {
		if !proto.Equal(o, cb[k]) {
			t.Fatalf("%s: copy %s is %v, a full load has %v", what, k, o, cb[k])
		}
	}
	ta, tb := a.Targets(), b.Targets()
	if len(ta) != len(tb) {
		t.Fatalf("%s: %d targets, a full load %d", what, len(ta), len(tb))
	}
	for i := range ta {
		if !proto.Equal(ta[i], tb[i]) {
			t.Fatalf("%s: target %v, a full load has %v", what, ta[i], tb[i])
		}
	}
	if !proto.Equal(a.Policy(), b.Policy()) {
		t.Fatalf("%s: policy %v, a full load has %v", what, a.Policy(), b.Policy())
	}
}

// putRecords writes READY records of keys 0..n-1, key i at target(i), one write each.
func putRecords(t *testing.T, r *Registry, n int, target func(int) string) {
	t.Helper()
	for i := range n {
		if err := r.PutObject(context.Background(), testRecord(testKey(i), target(i), "u", "b", 1, time.Now(), 0)); err != nil {
			t.Fatal(err)
		}
	}
}

// loaded is a watcher of prefix that has read everything once.
func loaded(t *testing.T, cli *clientv3.Client, prefix, checkpoint string) *Watcher {
	t.Helper()
	w := NewWatcher(cli, prefix, nil)
	w.Checkpoint(checkpoint)
	if _, err := w.load(context.Background()); err != nil {
		t.Fatal(err)
	}
	return w
}

// A start that resumes from a checkpoint serves what a full read would: the copies, targets and
// policy as they are now, after records were added, replaced, retired and made not servable
// since the checkpoint was written.
func TestResumeFromACheckpointIsTheStateNow(t *testing.T) {
	t.Parallel()
	cli, prefix := sharedEtcd(t), testPrefix(t)
	r := NewRegistry(cli, prefix)
	ctx := context.Background()
	for _, name := range []string{"a", "b"} {
		if _, err := r.CreateTarget(ctx, validTarget(name)); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	for i := range 300 {
		o := testRecord(testKey(i), []string{"a", "b"}[i%2], "u", "b1", uint64(i), now, 0)
		o.Transient = i%5 == 0
		if i%3 == 0 {
			o.Bucket, o.ObjectName = "b2", "p/"+o.Key
		}
		if err := r.PutObject(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(t.TempDir(), "index.checkpoint")
	w := loaded(t, cli, prefix, path)
	written, err := w.WriteCheckpoint()
	if err != nil || written != w.Snapshot().applied {
		t.Fatalf("checkpoint at %d (snapshot at %d): %v", written, w.Snapshot().applied, err)
	}
	if again, err := w.WriteCheckpoint(); again != 0 || err != nil {
		t.Fatalf("a second checkpoint of the same revision: %d, %v", again, err)
	}

	// What changes while the replica is down.
	for i := 300; i < 350; i++ { // new copies, one of a key already at the other target
		if err := r.PutObject(ctx, testRecord(testKey(i%310), "b", "u", "b1", uint64(i), now, time.Hour)); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 40; i += 4 { // retired
		if _, _, err := r.DeleteObjects(ctx, testKey(i), "test", now); err != nil {
			t.Fatal(err)
		}
	}
	replaced := testRecord(testKey(7), "b", "u", "b3", 777, now, 0)
	if err := r.PutObject(ctx, replaced); err != nil {
		t.Fatal(err)
	}
	pending := testRecord(testKey(10), "b", "u", "b1", 10, now, 0) // a copy at b no longer READY (key 10 is also at a)
	pending.State = pb.ObjectState_OBJECT_STATE_FILLING
	if err := r.PutObject(ctx, pending); err != nil {
		t.Fatal(err)
	}
	if _, err := r.CreateTarget(ctx, validTarget("c")); err != nil {
		t.Fatal(err)
	}
	last, err := r.SetPolicy(ctx, &pb.Policy{MinRedirectBytes: 10})
	if err != nil {
		t.Fatal(err)
	}

	resumed := NewWatcher(cli, prefix, nil)
	resumed.Checkpoint(path)
	rev, err := resumed.resume(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The etcd is shared with other tests, whose writes move its revision: the resume must hold
	// this test's last write (a snapshot's revision is its last event's, not etcd's).
	if rev < last.Revision {
		t.Fatalf("resumed at revision %d, before the last write (%d)", rev, last.Revision)
	}
	full := loaded(t, cli, prefix, "")
	sameState(t, "resumed", resumed.Snapshot(), full.Snapshot())
	if n := len(allCopies(w.Snapshot())); n == len(allCopies(full.Snapshot())) {
		t.Fatalf("nothing changed after the checkpoint (%d copies): the test proves nothing", n)
	}
	if k, _ := ParseKey(testKey(10)); len(resumed.Snapshot().Copies(k)) != 1 {
		t.Fatalf("key 10 has %d copies: its copy at b is no longer READY, the one at a is", len(resumed.Snapshot().Copies(k)))
	}
}

// A resume while writes continue is the state at the revision it resumes to, like a load.
func TestResumeWhileWritesContinueIsTheStateAtItsRevision(t *testing.T) {
	t.Parallel()
	_, cli := startEtcd(t)
	ctx := context.Background()
	r := NewRegistry(cli, "")
	putRecords(t, r, 500, func(i int) string { return fmt.Sprint("t", i%3) })
	path := filepath.Join(t.TempDir(), "cp")
	w := loaded(t, cli, "", path)
	if _, err := w.WriteCheckpoint(); err != nil {
		t.Fatal(err)
	}
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	var written atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 500; wctx.Err() == nil; i++ {
			if r.PutObject(wctx, testRecord(testKey(i), "t9", "u", "b", 1, time.Now(), 0)) == nil {
				written.Add(1)
			}
			if i%5 == 0 {
				_, _, _ = r.DeleteObjects(wctx, testKey(i-500), "test", time.Now())
			}
		}
	}()
	for written.Load() < 200 {
		time.Sleep(10 * time.Millisecond)
	}
	for range 3 {
		before := written.Load()
		resumed := NewWatcher(cli, "", nil)
		resumed.Checkpoint(path)
		rev, err := resumed.resume(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if written.Load() == before {
			t.Fatal("no write landed during the resume; the test proves nothing")
		}
		if want, got := objectsAt(t, cli, rev), targetsOf(resumed.Snapshot()); !sameCopies(got, want) {
			t.Fatalf("resumed at revision %d with %d keys; etcd at that revision has %d", rev, len(got), len(want))
		}
	}
	stop()
	<-done
}

// A checkpoint that cannot say what is current is not resumed from, and the watcher reads
// everything instead: damaged, cut short, of another prefix or etcd cluster, ahead of etcd, or
// older than etcd's compacted history.
func TestUnusableCheckpointsAreSetAsideForAFullRead(t *testing.T) {
	t.Parallel()
	_, cli := startEtcd(t)
	ctx := context.Background()
	r := NewRegistry(cli, "")
	putRecords(t, r, 50, func(int) string { return "t" })
	w := loaded(t, cli, "", "")
	snap := w.Snapshot()
	id := w.cp.clusterID.Load()
	encode := func(rev int64, cluster uint64, prefix string) []byte {
		var b bytes.Buffer
		if _, err := encodeCheckpoint(&b, snap.objects, rev, cluster, prefix); err != nil {
			t.Fatal(err)
		}
		return b.Bytes()
	}
	good := encode(snap.applied, id, DefaultPrefix)
	flipped := bytes.Clone(good)
	flipped[len(flipped)/2] ^= 1
	dir := t.TempDir()
	try := func(name string, content []byte) error {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, content, 0o600); err != nil {
			t.Fatal(err)
		}
		rw := NewWatcher(cli, "", nil)
		rw.Checkpoint(path)
		_, err := rw.resume(ctx)
		return err
	}
	if err := try("good", good); err != nil {
		t.Fatalf("the intact checkpoint: %v", err)
	}
	for name, content := range map[string][]byte{
		"damaged":       flipped,
		"cut short":     good[:len(good)-5],
		"other prefix":  encode(snap.applied, id, "/other/"),
		"other cluster": encode(snap.applied, id+1, DefaultPrefix),
		"ahead of etcd": encode(snap.applied+1000, id, DefaultPrefix),
		"empty":         nil,
	} {
		if err := try(name, content); !errors.As(err, &errUnusable{}) {
			t.Errorf("%s: resume says %v, want it unusable", name, err)
		}
	}
	// Compacted: history after the checkpoint's revision is gone.
	if err := r.PutObject(ctx, testRecord(testKey(99), "t", "u", "b", 1, time.Now(), 0)); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(ctx, "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	if err := try("compacted", good); !errors.As(err, &errUnusable{}) {
		t.Fatalf("compacted: resume says %v, want it unusable", err)
	}
	// Run then reads everything: the copy written after the checkpoint is there.
	rw := NewWatcher(cli, "", nil)
	rw.Checkpoint(filepath.Join(dir, "compacted"))
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { rw.Run(rctx); close(done) }()
	defer func() { cancel(); <-done }()
	<-rw.Ready()
	if got := rw.Snapshot().ObjectCount(); got != 51 {
		t.Fatalf("after an unusable checkpoint the watcher holds %d copies, want 51", got)
	}
}

// A checkpoint decodes to the index it was written from, homes and every field included.
func TestCheckpointRoundTrip(t *testing.T) {
	snap := emptySnapshot()
	b := newIndexBuilder(snap.objects)
	for i := range 2000 {
		k, _ := ParseKey(testKey(i * 7919))
		h := homes.intern(Home{Target: fmt.Sprint("t", i%3), TargetUID: "u", Bucket: fmt.Sprint("b", i%2), Prefix: "p/",
			MediaType: "application/x"})
		o := Object{home: h, Size: uint64(i), Created: int64(i) << 20, Expires: int64(i%4) << 30, ModRevision: int64(i + 1),
			Generation: int64(i * 3), CRC32C: uint32(i * 31), Transient: i%2 == 0}
		o.SHA256[i%32], o.SHA1[i%20] = byte(i), byte(i>>8)
		b.put(k, o)
	}
	snap.objects = b.build()
	var buf bytes.Buffer
	if _, err := encodeCheckpoint(&buf, snap.objects, 42, 7, "/p/"); err != nil {
		t.Fatal(err)
	}
	cp, err := decodeCheckpoint(bytes.NewReader(buf.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if cp.revision != 42 || cp.clusterID != 7 || cp.prefix != "/p/" {
		t.Fatalf("header %d %d %q", cp.revision, cp.clusterID, cp.prefix)
	}
	got := emptySnapshot()
	got.objects = cp.objects
	a, want := allCopies(got), allCopies(snap)
	if len(a) != len(want) || len(want) < 1900 {
		t.Fatalf("%d copies decoded, %d written", len(a), len(want))
	}
	for k, o := range want {
		if !proto.Equal(o, a[k]) {
			t.Fatalf("copy %s decoded as %v, written %v", k, a[k], o)
		}
	}
	var again bytes.Buffer
	if _, err := encodeCheckpoint(&again, cp.objects, 42, 7, "/p/"); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), again.Bytes()) {
		t.Fatal("a decoded checkpoint does not encode to the same bytes")
	}
}

// FuzzDecodeCheckpoint: a checkpoint file is read at start; whatever it holds, decoding refuses it
// or yields an index whose copies are all in their leaves, in order, with known homes.
func FuzzDecodeCheckpoint(f *testing.F) {
	snap := emptySnapshot()
	b := newIndexBuilder(snap.objects)
	for i := range 5 {
		k, _ := ParseKey(testKey(i))
		b.put(k, Object{home: homes.intern(Home{Target: fmt.Sprint("t", i%2), Bucket: "b"}), Size: uint64(i)})
	}
	snap.objects = b.build()
	var buf bytes.Buffer
	if _, err := encodeCheckpoint(&buf, snap.objects, 9, 1, "/detour/v1/"); err != nil {
		f.Fatal(err)
	}
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		cp, err := decodeCheckpoint(bytes.NewReader(data))
		if err != nil {
			return
		}
		n := 0
		for s := range leafCount {
			l := cp.objects.leaf(s)
			if l == nil {
				continue
			}
			for i, k := range l.keys {
				if shardOf(k) != s || i > 0 && compareKeys(l.keys[i-1], k) > 0 {
					t.Fatalf("key %s misplaced in leaf %d", k, s)
				}
				_ = l.objs[i].Home() // panics on an unknown home
				n++
			}
		}
		if n != cp.objects.count {
			t.Fatalf("%d copies, count %d", n, cp.objects.count)
		}
	})
}

// A watch that starts behind is sent etcd's history in batches stamped with etcd's current
// revision; no snapshot it publishes may claim a revision whose events it does not hold.
func TestSnapshotsOfAWatchThatStartsBehindHoldTheirRevision(t *testing.T) {
	t.Parallel()
	cli, prefix := sharedEtcd(t), testPrefix(t)
	r := NewRegistry(cli, prefix)
	ctx := context.Background()
	w := loaded(t, cli, prefix, "")
	rev := w.Snapshot().applied
	const n = 2500 // more than the 1000 revisions etcd sends a behind watch at once
	putRecords(t, r, n, func(int) string { return "t" })
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go w.watch(wctx, rev)
	snap := w.Snapshot()
	seen := 0
	for snap.ObjectCount() < n {
		select {
		case <-snap.Superseded():
		case <-time.After(10 * time.Second):
			t.Fatalf("stuck at %d objects", snap.ObjectCount())
		}
		snap = w.Snapshot()
		resp, err := cli.Get(ctx, prefix+"objects/", clientv3.WithPrefix(), clientv3.WithCountOnly(), clientv3.WithRev(snap.Revision))
		if err != nil {
			t.Fatal(err)
		}
		if int64(snap.ObjectCount()) != resp.Count {
			t.Fatalf("a snapshot at revision %d holds %d objects; etcd held %d at that revision", snap.Revision, snap.ObjectCount(), resp.Count)
		}
		seen++
	}
	t.Logf("%d snapshots checked", seen)
}

// Before a watch starts again from where the snapshot is, etcd must be the cluster it was read
// from, not behind it.
func TestFollowingOnNeedsTheSameEtcd(t *testing.T) {
	t.Parallel()
	cli, prefix := sharedEtcd(t), testPrefix(t)
	w := loaded(t, cli, prefix, "")
	rev := w.Snapshot().applied
	if err := w.sameEtcd(context.Background(), rev); err != nil {
		t.Fatalf("the same etcd: %v", err)
	}
	if err := w.sameEtcd(context.Background(), rev+1_000_000); !errors.Is(err, errNotFollowing) {
		t.Fatalf("an etcd behind the snapshot: %v", err)
	}
	w.cp.clusterID.Add(1)
	if err := w.sameEtcd(context.Background(), rev); !errors.Is(err, errNotFollowing) {
		t.Fatalf("another cluster: %v", err)
	}
}
