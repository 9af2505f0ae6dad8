package targets

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	etcdpb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/etcdembed"
	"github.com/detourhq/detour/internal/testbed"
)

// copyLoader is a watcher of prefix whose loads read copies of etcd's database in dir.
func copyLoader(cli *clientv3.Client, prefix, dir string, log *slog.Logger) *Watcher {
	w := NewWatcher(cli, prefix, log)
	w.LoadFromDatabaseCopies(dir, 0)
	return w
}

// churn writes what a registry sees over time: copies in both encodings, replaced, retired, made
// not servable, put back; a target added and one removed; health, a claim, the policy; and keys of
// another prefix in the same etcd.
func churn(t *testing.T, cli *clientv3.Client, round int) {
	t.Helper()
	ctx := context.Background()
	r, old := NewRegistry(cli, ""), NewRegistry(cli, "")
	old.SetRecordEncoding(EncodingProto)
	now := time.Now()
	for _, name := range []string{"a", "b", fmt.Sprint("r", round)} {
		if _, err := r.CreateTarget(ctx, validTarget(name)); err != nil && round == 0 {
			t.Fatal(err)
		}
	}
	if round > 0 {
		if _, err := r.DeleteTarget(ctx, fmt.Sprint("r", round-1)); err != nil {
			t.Fatal(err)
		}
	}
	base := round * 100
	for i := base; i < base+400; i++ {
		reg := []*Registry{r, old}[i%2]
		o := testRecord(testKey(i), []string{"a", "b"}[i%2], "u", "b1", uint64(i), now, 0)
		if i%3 == 0 {
			o.Bucket, o.ObjectName = "b2", "p/"+o.Key
		}
		o.Transient = i%5 == 0
		if err := reg.PutObject(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	for i := base; i < base+400; i += 7 { // replaced: a new generation at the same target
		o := testRecord(testKey(i), []string{"a", "b"}[i%2], "u", "b3", uint64(i)+1, now, time.Hour)
		o.Generation = 9
		if err := r.PutObject(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	for i := base; i < base+400; i += 11 { // retired
		if _, _, err := r.DeleteObjects(ctx, testKey(i), "test", now); err != nil {
			t.Fatal(err)
		}
	}
	for i := base + 1; i < base+400; i += 13 { // no longer servable, some of them put back
		o := testRecord(testKey(i), []string{"a", "b"}[i%2], "u", "b1", 1, now, 0)
		o.State = pb.ObjectState_OBJECT_STATE_FILLING
		if err := r.PutObject(ctx, o); err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 {
			o.State = pb.ObjectState_OBJECT_STATE_READY
			if err := old.PutObject(ctx, o); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, name := range []string{"a", "b"} {
		if err := r.SetHealth(ctx, &pb.TargetHealth{Target: name, Healthy: round%2 == 0}); err != nil {
			t.Fatal(err)
		}
	}
	policy := &pb.Policy{MinRedirectBytes: uint64(10 + round)}
	if round > 0 {
		resp, err := cli.Get(ctx, r.policyKey())
		if err != nil || len(resp.Kvs) != 1 {
			t.Fatalf("policy: %v", err)
		}
		policy.Revision = resp.Kvs[0].ModRevision
	}
	if _, err := r.SetPolicy(ctx, policy); err != nil {
		t.Fatal(err)
	}
	for i := range 50 { // a neighbour in the same etcd, objects/ included
		if _, err := cli.Put(ctx, fmt.Sprintf("/other/objects/%s/a", testKey(i)), "not ours"); err != nil {
			t.Fatal(err)
		}
	}
}

// A load from a copy of etcd's database is what a ranged read at the same revision is, whatever
// history etcd still holds (every revision before a compaction, the last ones after it).
func TestACopyOfEtcdsDatabaseLoadsWhatARangedReadDoes(t *testing.T) {
	_, cli := startEtcd(t)
	ctx := context.Background()
	dir := t.TempDir()
	for round := range 3 {
		churn(t, cli, round)
		if round == 1 { // compact everything so far; the next round's history stays
			resp, err := cli.Get(ctx, "x")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := cli.Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
				t.Fatal(err)
			}
		}
		copied := copyLoader(cli, "", dir, nil)
		rev, err := copied.load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if n, declined := copied.DatabaseCopies(); n != 1 || declined != 0 {
			t.Fatalf("round %d: %d loads from a copy, %d declined; want the load to read a copy", round, n, declined)
		}
		ranged := NewWatcher(cli, "", nil)
		rangedRev, err := ranged.load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if rev != rangedRev {
			t.Fatalf("round %d: the copy is at revision %d, the ranged read at %d (nothing was written between)", round, rev, rangedRev)
		}
		sameState(t, fmt.Sprintf("round %d, from a copy", round), copied.Snapshot(), ranged.Snapshot())
		if got, want := modRevisions(copied.Snapshot()), modRevisions(ranged.Snapshot()); !equalMaps(got, want) {
			t.Fatalf("round %d: the copies' revisions differ from a ranged read's", round)
		}
		if a, b := copied.Snapshot(), ranged.Snapshot(); len(a.health) != len(b.health) || len(a.claims) != len(b.claims) ||
			a.Revision != b.Revision || a.TargetsRevision != b.TargetsRevision {
			t.Fatalf("round %d: health %d, claims %d, revisions %d/%d; a ranged read %d, %d, %d/%d", round,
				len(a.health), len(a.claims), a.Revision, a.TargetsRevision, len(b.health), len(b.claims), b.Revision, b.TargetsRevision)
		}
		if entries, err := os.ReadDir(dir); err != nil || len(entries) != 0 {
			t.Fatalf("round %d: the copy's directory holds %d files after the load (%v)", round, len(entries), err)
		}
	}
}

func modRevisions(s *Snapshot) map[string]int64 {
	out := map[string]int64{}
	s.EachObject(func(k Key, o *Object) bool { out[k.String()+"/"+o.Target()] = o.ModRevision; return true })
	return out
}

func equalMaps(a, b map[string]int64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// A replica that loaded from a copy follows etcd from the copy's revision: what is written after
// the copy, while and after the replica loads, reaches its snapshot.
func TestAfterACopyTheWatchFollowsOn(t *testing.T) {
	_, cli := startEtcd(t)
	ctx := context.Background()
	churn(t, cli, 0)
	w := copyLoader(cli, "", t.TempDir(), nil)
	run(t, w)
	if n, _ := w.DatabaseCopies(); n != 1 {
		t.Fatalf("%d loads from a copy", n)
	}
	r := NewRegistry(cli, "")
	late := testRecord(testKey(5000), "a", "u", "b1", 1, time.Now(), 0)
	if err := r.PutObject(ctx, late); err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.DeleteObjects(ctx, testKey(2), "test", time.Now()); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the writes after the copy reach the snapshot", func() bool {
		s := w.Snapshot()
		return len(s.Copies(mustKey(t, testKey(5000)))) == 1 && len(s.Copies(mustKey(t, testKey(2)))) == 0
	})
}

func mustKey(t *testing.T, s string) Key {
	t.Helper()
	k, ok := ParseKey(s)
	if !ok {
		t.Fatalf("%q is not a key", s)
	}
	return k
}

// churnedEtcd is an etcd after one round of churn, and a watcher that read it by range.
func churnedEtcd(t *testing.T) (*etcdembed.Server, *clientv3.Client, *Watcher) {
	t.Helper()
	srv, cli := startEtcd(t)
	churn(t, cli, 0)
	want := NewWatcher(cli, "", nil)
	if _, err := want.load(context.Background()); err != nil {
		t.Fatal(err)
	}
	return srv, cli, want
}

// interceptedClient is a client of srv whose streams pass through interceptor.
func interceptedClient(t *testing.T, srv *etcdembed.Server, interceptor grpc.StreamClientInterceptor) *clientv3.Client {
	t.Helper()
	cfg := srv.ClientConfig()
	cfg.DialOptions = append(cfg.DialOptions, grpc.WithStreamInterceptor(interceptor))
	cli, err := clientv3.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// noCopyLeft fails the test if the copies' directory holds anything.
func noCopyLeft(t *testing.T, dir string) {
	t.Helper()
	if entries, err := os.ReadDir(dir); err != nil || len(entries) != 0 {
		t.Fatalf("the copies' directory holds %d files (%v)", len(entries), err)
	}
}

// A copy that cannot be used is not used: too large for the configured bound, or not what etcd's
// digest says (here a byte changed on its way). The load reads by range instead, says why, and
// leaves nothing behind.
func TestACopyThatCannotBeUsedFallsBackToARangedRead(t *testing.T) {
	srv, cli, want := churnedEtcd(t)
	ctx := context.Background()

	dir := t.TempDir()
	var logs testbed.Buffer
	small := NewWatcher(cli, "", slog.New(slog.NewTextHandler(&logs, nil)))
	small.LoadFromDatabaseCopies(dir, 4096)
	if _, err := small.load(ctx); err != nil {
		t.Fatal(err)
	}
	sameState(t, "over the size bound", small.Snapshot(), want.Snapshot())
	if n, declined := small.DatabaseCopies(); n != 0 || declined != 1 || !strings.Contains(logs.String(), "more than the 4096 a copy may take") {
		t.Fatalf("over the size bound: %d loads from a copy, %d declined; log:\n%s", n, declined, logs.String())
	}

	// A client whose connection changes one byte of the copy in transit.
	bent := interceptedClient(t, srv, flipOneByte)
	var logs2 testbed.Buffer
	damaged := copyLoader(bent, "", dir, slog.New(slog.NewTextHandler(&logs2, nil)))
	if _, err := damaged.load(ctx); err != nil {
		t.Fatal(err)
	}
	sameState(t, "a damaged copy", damaged.Snapshot(), want.Snapshot())
	if n, declined := damaged.DatabaseCopies(); n != 0 || declined != 1 || !strings.Contains(logs2.String(), "does not match its SHA-256") {
		t.Fatalf("a damaged copy: %d loads from a copy, %d declined; log:\n%s", n, declined, logs2.String())
	}
	noCopyLeft(t, dir)
	// A copy an earlier process left behind is replaced, not trusted.
	if err := os.WriteFile(filepath.Join(dir, "etcd-db.copy"), []byte("stale"), 0o600); err != nil {
		t.Fatal(err)
	}
	again := copyLoader(cli, "", dir, nil)
	if _, err := again.load(ctx); err != nil {
		t.Fatal(err)
	}
	if n, _ := again.DatabaseCopies(); n != 1 {
		t.Fatal("a stale copy in the directory kept the load from taking a new one")
	}
	sameState(t, "after a stale copy", again.Snapshot(), want.Snapshot())
}

// flipOneByte changes a byte in the middle of the first part of a database copy it receives.
func flipOneByte(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	s, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil || method != "/etcdserverpb.Maintenance/Snapshot" {
		return s, err
	}
	return &flipping{ClientStream: s}, nil
}

type flipping struct {
	grpc.ClientStream
	done bool
}

func (f *flipping) RecvMsg(m any) error {
	err := f.ClientStream.RecvMsg(m)
	if r, ok := m.(*etcdpb.SnapshotResponse); ok && err == nil && !f.done && len(r.Blob) > 8192 {
		r.Blob[len(r.Blob)/2] ^= 0x40
		f.done = true
	}
	return err
}

// FuzzParseKeyValue: the records of a database copy are decoded without the protobuf library;
// whatever the bytes, the decoder must not panic, and where the library reads a KeyValue with a
// key, the decoder must read the same one.
func FuzzParseKeyValue(f *testing.F) {
	for _, kv := range []*mvccpb.KeyValue{
		{Key: []byte("/detour/v1/objects/" + testKey(1) + "/a"), Value: []byte{0, 1, 2}, CreateRevision: 5, ModRevision: 9, Version: 2},
		{Key: []byte("/detour/v1/alive/a"), Value: []byte("1"), CreateRevision: 1 << 40, ModRevision: 1 << 41, Version: 1, Lease: 0x694d71ddfa2c4b05},
		{Key: []byte("k")},
	} {
		b, err := proto.Marshal(kv)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		got, ok := parseKeyValue(b)
		var want mvccpb.KeyValue
		if err := proto.Unmarshal(b, &want); err != nil || len(want.Key) == 0 {
			return // what the library refuses may be read or not; it must only not panic
		}
		if !ok || !bytes.Equal(got.key, want.Key) || !bytes.Equal(got.value, want.Value) || got.createRevision != want.CreateRevision ||
			got.version != want.Version || got.lease != want.Lease {
			t.Fatalf("decoded %+v (%v), the protobuf library %v", got, ok, &want)
		}
	})
}

// A copy whose stream goes quiet is abandoned after the idle bound: the load reads by range, says
// why, and leaves nothing behind.
func TestACopyThatStallsIsAbandonedForARangedRead(t *testing.T) {
	srv, _, want := churnedEtcd(t)
	ctx := context.Background()
	quiet := interceptedClient(t, srv, stallAfterFirst)
	dir := t.TempDir()
	var logs testbed.Buffer
	w := copyLoader(quiet, "", dir, slog.New(slog.NewTextHandler(&logs, nil)))
	// Long enough for etcd's first part on a busy machine (it commits its backend first), short
	// enough for a test.
	w.dbcopy.idle = 2 * time.Second
	began := time.Now()
	if _, err := w.load(ctx); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(began); d > 10*time.Second {
		t.Errorf("the load took %s: the stall was not cut at its bound", d)
	}
	sameState(t, "after a stalled copy", w.Snapshot(), want.Snapshot())
	if n, declined := w.DatabaseCopies(); n != 0 || declined != 1 || !strings.Contains(logs.String(), "stalled for 2s") {
		t.Fatalf("a stalled copy: %d loads from a copy, %d declined; log:\n%s", n, declined, logs.String())
	}
	noCopyLeft(t, dir)
}

// stallAfterFirst passes the first part of a database copy, then sends nothing more until the
// stream is cancelled.
func stallAfterFirst(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	s, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil || method != "/etcdserverpb.Maintenance/Snapshot" {
		return s, err
	}
	return &stalling{ClientStream: s, ctx: ctx}, nil
}

type stalling struct {
	grpc.ClientStream
	ctx  context.Context
	sent bool
}

func (s *stalling) RecvMsg(m any) error {
	if s.sent {
		<-s.ctx.Done()
		return status.FromContextError(s.ctx.Err()).Err()
	}
	s.sent = true
	return s.ClientStream.RecvMsg(m)
}

// With authentication on, etcd gives a copy of its database only to the root role. A replica
// whose user may read Detour's prefix and no more is refused: its load reads by range, it says
// that etcd refuses copies, and its later loads do not ask again.
func TestEtcdThatRefusesCopiesIsNotAskedAgain(t *testing.T) {
	srv, cli, want := churnedEtcd(t)
	ctx := context.Background()
	must := func(_ any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(cli.RoleAdd(ctx, "root"))
	must(cli.UserAdd(ctx, "root", "root-password"))
	must(cli.UserGrantRole(ctx, "root", "root"))
	must(cli.RoleAdd(ctx, "detour"))
	must(cli.RoleGrantPermission(ctx, "detour", DefaultPrefix, clientv3.GetPrefixRangeEnd(DefaultPrefix), clientv3.PermissionType(clientv3.PermReadWrite)))
	must(cli.UserAdd(ctx, "detour", "detour-password"))
	must(cli.UserGrantRole(ctx, "detour", "detour"))
	must(cli.AuthEnable(ctx))

	cfg := srv.ClientConfig()
	cfg.Username, cfg.Password = "detour", "detour-password"
	user, err := clientv3.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer user.Close()
	dir := t.TempDir()
	var logs testbed.Buffer
	w := copyLoader(user, "", dir, slog.New(slog.NewTextHandler(&logs, nil)))
	for i := range 2 {
		if _, err := w.load(ctx); err != nil {
			t.Fatalf("load %d: %v", i+1, err)
		}
		sameState(t, fmt.Sprintf("load %d by a user without the root role", i+1), w.Snapshot(), want.Snapshot())
	}
	if n, declined := w.DatabaseCopies(); n != 0 || declined != 1 || strings.Count(logs.String(), "etcd refuses copies of its database") != 1 {
		t.Fatalf("two loads by a user etcd refuses copies to: %d from a copy, %d declined (want 0, 1: the second does not ask); log:\n%s", n, declined, logs.String())
	}
	noCopyLeft(t, dir)
}

// etcd may compact past a copy's revision before the watch that follows the copy starts (the
// janitor compacts on its own schedule): the watch then finds its history gone, and the watcher
// reads everything again, from a new copy, rather than serve a snapshot that misses what was
// written in between.
func TestACopyWhoseHistoryIsCompactedBeforeTheWatchIsReadAgain(t *testing.T) {
	srv, cli, _ := churnedEtcd(t)
	ctx := context.Background()
	gate, held := make(chan struct{}), make(chan struct{})
	var once sync.Once
	// The first watch waits at the gate; the test writes and compacts meanwhile.
	holdFirstWatch := func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		if method == "/etcdserverpb.Watch/Watch" {
			first := false
			once.Do(func() { first = true })
			if first {
				close(held)
				select {
				case <-gate:
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			}
		}
		return streamer(ctx, desc, cc, method, opts...)
	}
	var logs testbed.Buffer
	w := copyLoader(interceptedClient(t, srv, holdFirstWatch), "", t.TempDir(), slog.New(slog.NewTextHandler(&logs, nil)))
	run(t, w)
	select {
	case <-held:
	case <-time.After(30 * time.Second):
		t.Fatal("the watch after the copy never started")
	}
	late := testRecord(testKey(7000), "a", "u", "b1", 1, time.Now(), 0)
	if err := NewRegistry(cli, "").PutObject(ctx, late); err != nil {
		t.Fatal(err)
	}
	head, err := cli.Get(ctx, "/")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctx, head.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	if len(w.Snapshot().Copies(mustKey(t, testKey(7000)))) != 0 {
		t.Fatal("the record written after the copy is in its snapshot before any watch")
	}
	close(gate)
	eventually(t, 20*time.Second, "the record written after the copy, by a second read", func() bool {
		return len(w.Snapshot().Copies(mustKey(t, testKey(7000)))) == 1
	})
	if n, declined := w.DatabaseCopies(); n != 2 || declined != 0 {
		t.Fatalf("%d loads from a copy, %d declined: want the first and the read after the compaction", n, declined)
	}
	if !strings.Contains(logs.String(), "re-reading everything") {
		t.Fatalf("the log does not say why everything was read again:\n%s", logs.String())
	}
}
