package targets

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/etcdembed"
	"github.com/detourhq/detour/internal/testbed"
)

func startEtcd(t testing.TB) (*etcdembed.Server, *clientv3.Client) {
	t.Helper()
	srv, err := etcdembed.Start(context.Background(), etcdembed.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	cli, err := clientv3.New(srv.ClientConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return srv, cli
}

// shared is the package's etcd, started by the first test that asks for it and stopped by
// TestMain; tests that do not stop or compact their etcd share it, each under a prefix of its own
// (testPrefix).
var shared struct {
	once sync.Once
	dir  string
	srv  *etcdembed.Server
	cli  *clientv3.Client
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.srv != nil {
		shared.cli.Close()
		shared.srv.Close()
		os.RemoveAll(shared.dir)
		os.RemoveAll(shared.dir + "-pki")
	}
	os.Exit(code)
}

// sharedEtcd is a client of the package's etcd.
func sharedEtcd(t testing.TB) *clientv3.Client {
	t.Helper()
	shared.once.Do(func() {
		if shared.dir, shared.err = os.MkdirTemp("", "targets-etcd-"); shared.err != nil {
			return
		}
		if shared.srv, shared.err = etcdembed.Start(context.Background(), etcdembed.Config{Dir: shared.dir}); shared.err != nil {
			return
		}
		shared.cli, shared.err = clientv3.New(shared.srv.ClientConfig())
	})
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	return shared.cli
}

// testPrefix is the test's own prefix in the shared etcd.
func testPrefix(t testing.TB) string { return "/detour-test/" + t.Name() + "/" }

func validTarget(name string) *pb.Target {
	return &pb.Target{Name: name, Protocol: "https", Uris: []string{"https://cdn.example.com/"},
		TlsVersions: []string{"1.2", "1.3"}, Region: "us-east1", Weight: 1,
		Store:   &pb.GcsStore{Bucket: "detour-objects", Prefix: "hg/"},
		UrlForm: &pb.UrlForm{Form: &pb.UrlForm_CdnBaseUrl{CdnBaseUrl: "https://cdn.example.com/"}}}
}

func watch(t testing.TB, cli *clientv3.Client, prefix string) *Watcher {
	t.Helper()
	w := NewWatcher(cli, prefix, nil)
	run(t, w)
	return w
}

// run runs w until the test ends and waits for its first snapshot.
func run(t testing.TB, w *Watcher) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-w.Ready():
	case <-time.After(30 * time.Second):
		t.Fatal("no snapshot within 30s")
	}
}

var eventually = testbed.Eventually

// While nothing changes, etcd's progress notifications keep the snapshot confirmed current; when
// etcd goes away, the confirmation ages, so the age means staleness, not time since the last write.
func TestSnapshotConfirmationMeansStaleness(t *testing.T) {
	t.Parallel()
	srv, cli := startEtcd(t)
	w := NewWatcher(cli, "", nil)
	w.progressInterval = 100 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	<-w.Ready()
	built := w.Snapshot().Built
	time.Sleep(time.Second)
	if age := time.Since(w.Confirmed()); age > 500*time.Millisecond {
		t.Fatalf("with etcd healthy and idle the snapshot is %s unconfirmed", age)
	}
	if w.Snapshot().Built != built {
		t.Fatal("progress notifications rebuilt the snapshot")
	}
	srv.Close()
	time.Sleep(time.Second)
	if age := time.Since(w.Confirmed()); age < 700*time.Millisecond {
		t.Fatalf("with etcd gone the snapshot is still confirmed %s ago", age)
	}
}

func TestValidationNamesTheField(t *testing.T) {
	cases := []struct {
		field string
		edit  func(*pb.Target)
	}{
		{"target.name", func(t *pb.Target) { t.Name = "Bad_Name" }},
		{"target.name", func(t *pb.Target) { t.Name = "-x" }},
		{"target.name", func(t *pb.Target) { t.Name = strings.Repeat("a", 64) }},
		{"target.protocol", func(t *pb.Target) { t.Protocol = "ftp" }},
		{"target.uris", func(t *pb.Target) { t.Uris = nil }},
		{"target.uris[0]", func(t *pb.Target) { t.Uris = []string{"http://cdn.example.com/"} }},
		{"target.uris[1]", func(t *pb.Target) { t.Uris = append(t.Uris, "://nope") }},
		{"target.uris[0]", func(t *pb.Target) { t.Uris = []string{"/relative"} }},
		{"target.sni_required", func(t *pb.Target) {
			t.Protocol, t.Uris, t.TlsVersions, t.SniRequired = "http", []string{"http://x/"}, nil, true
		}},
		{"target.tls_versions[1]", func(t *pb.Target) { t.TlsVersions = []string{"1.2", "1.4"} }},
		{"target.tls_versions[1]", func(t *pb.Target) { t.TlsVersions = []string{"1.2", "1.2"} }},
		{"target.region", func(t *pb.Target) { t.Region = "" }},
		{"target.weight", func(t *pb.Target) { t.Weight = 0 }},
		{"target.state", func(t *pb.Target) { t.State = 9 }},
		{"target.store", func(t *pb.Target) { t.Store = nil }},
		{"target.store.bucket", func(t *pb.Target) { t.Store.Bucket = "ab" }},
		{"target.store.bucket", func(t *pb.Target) { t.Store.Bucket = "Upper" }},
		{"target.store.bucket", func(t *pb.Target) { t.Store.Bucket = "googbucket" }},
		{"target.store.bucket", func(t *pb.Target) { t.Store.Bucket = "192.168.1.1" }},
		{"target.store.prefix", func(t *pb.Target) { t.Store.Prefix = "/abs" }},
		{"target.store.prefix", func(t *pb.Target) { t.Store.Prefix = "a/../b" }},
		{"target.store.prefix", func(t *pb.Target) { t.Store.Prefix = "a\nb" }},
		{"target.url_form", func(t *pb.Target) { t.UrlForm = nil }},
		{"target.url_form.public_base_url", func(t *pb.Target) {
			t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: "gs://bucket"}}
		}},
		{"target.url_form.signed.ttl", func(t *pb.Target) {
			t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_Signed{Signed: &pb.SignedUrls{}}}
		}},
		{"target.url_form.signed.ttl", func(t *pb.Target) {
			t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_Signed{Signed: &pb.SignedUrls{Ttl: durationpb.New(8 * 24 * time.Hour)}}}
		}},
	}
	for _, c := range cases {
		tg := validTarget("t1")
		c.edit(tg)
		err := ValidateTarget(tg)
		var ve *ValidationError
		if !errors.As(err, &ve) || ve.Field != c.field {
			t.Errorf("%s: got %v, want a ValidationError on %s", c.field, err, c.field)
		}
	}
	ok := validTarget("t1")
	if err := ValidateTarget(ok); err != nil || ok.State != pb.TargetState_TARGET_STATE_ACTIVE {
		t.Fatalf("valid target: %v, state %v", err, ok.State)
	}
}

func TestTargetLifecycleAndCAS(t *testing.T) {
	t.Parallel()
	cli, prefix := sharedEtcd(t), testPrefix(t)
	r := NewRegistry(cli, prefix)
	ctx := context.Background()

	created, err := r.CreateTarget(ctx, validTarget("a"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.CreateTarget(ctx, validTarget("a")); !errors.Is(err, ErrExists) {
		t.Fatalf("second create: %v", err)
	}
	got, err := r.GetTarget(ctx, "a")
	if err != nil || got.Revision != created.Revision || !proto.Equal(storedTarget(got), storedTarget(created)) {
		t.Fatalf("round trip: %v\n got %v\nwant %v", err, got, created)
	}

	upd := proto.Clone(got).(*pb.Target)
	upd.Weight = 5
	after, err := r.UpdateTarget(ctx, upd)
	if err != nil || after.Revision <= got.Revision {
		t.Fatalf("update: %v", err)
	}
	stale := proto.Clone(got).(*pb.Target)
	stale.Weight = 7
	if _, err := r.UpdateTarget(ctx, stale); !errors.Is(err, ErrConflict) {
		t.Fatalf("stale update: %v", err)
	}
	if now, _ := r.GetTarget(ctx, "a"); now.Weight != 5 {
		t.Fatalf("stale update changed the weight to %d", now.Weight)
	}
	missing := validTarget("ghost")
	missing.Revision = 3
	if _, err := r.UpdateTarget(ctx, missing); !errors.Is(err, ErrNotFound) {
		t.Fatalf("update of a missing target: %v", err)
	}
	bad := proto.Clone(after).(*pb.Target)
	bad.Weight = 0
	if _, err := r.UpdateTarget(ctx, bad); err == nil {
		t.Fatal("invalid update accepted")
	}
	if now, _ := r.GetTarget(ctx, "a"); now.Weight != 5 || now.Revision != after.Revision {
		t.Fatalf("invalid update wrote something: %v", now)
	}

	dr, err := r.SetState(ctx, "a", pb.TargetState_TARGET_STATE_DRAINING)
	if err != nil || dr.State != pb.TargetState_TARGET_STATE_DRAINING {
		t.Fatalf("drain: %v", err)
	}
	if _, err := r.DeleteTarget(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.DeleteTarget(ctx, "a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v", err)
	}
	if _, err := r.GetTarget(ctx, "a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
}

func testKey(i int) string { return fmt.Sprintf("%064x", i+1) }

func TestWatcherFollowsWrites(t *testing.T) {
	t.Parallel()
	cli, prefix := sharedEtcd(t), testPrefix(t)
	r := NewRegistry(cli, prefix)
	ctx := context.Background()
	if _, err := r.CreateTarget(ctx, validTarget("before")); err != nil {
		t.Fatal(err)
	}
	w := watch(t, cli, prefix)
	if _, ok := w.Snapshot().Target("before"); !ok {
		t.Fatal("initial read missed a target")
	}
	first := w.Snapshot()
	if _, err := r.CreateTarget(ctx, validTarget("after")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-first.Superseded():
	case <-time.After(5 * time.Second):
		t.Fatal("snapshot not superseded after a write")
	}
	eventually(t, 5*time.Second, "new target in snapshot", func() bool { _, ok := w.Snapshot().Target("after"); return ok })
	if _, ok := first.Target("after"); ok {
		t.Fatal("a published snapshot was modified")
	}

	key := testKey(1)
	obj := testRecord(key, "after", "u", "b", 1234, time.Now(), 0)
	if err := r.PutObject(ctx, obj); err != nil {
		t.Fatal(err)
	}
	k, _ := ParseKey(key)
	targetsRev := w.Snapshot().TargetsRevision
	eventually(t, 5*time.Second, "object in snapshot", func() bool { return len(w.Snapshot().Copies(k)) == 1 })
	if got := w.Snapshot(); got.TargetsRevision != targetsRev || got.Revision <= targetsRev {
		t.Fatalf("an object event moved TargetsRevision %d → %d (revision %d)", targetsRev, got.TargetsRevision, got.Revision)
	}
	if n, _, err := r.DeleteObjects(ctx, key, "test", time.Now()); err != nil || n != 1 {
		t.Fatalf("delete objects: %d, %v", n, err)
	}
	eventually(t, 5*time.Second, "object gone", func() bool { return w.Snapshot().ObjectCount() == 0 })
	pol, err := r.SetPolicy(ctx, &pb.Policy{MinRedirectBytes: 10, RegionPreference: []string{"eu"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.SetPolicy(ctx, &pb.Policy{MinRedirectBytes: 11}); !errors.Is(err, ErrConflict) {
		t.Fatalf("policy without revision: %v", err)
	}
	eventually(t, 5*time.Second, "policy in snapshot", func() bool { return w.Snapshot().Policy().Revision == pol.Revision })
	if got := w.Snapshot().TargetsRevision; got != pol.Revision {
		t.Fatalf("TargetsRevision %d after a policy write at %d", got, pol.Revision)
	}
}

func TestWatcherLoadsManyObjectsAcrossPages(t *testing.T) {
	t.Parallel()
	cli, prefix := sharedEtcd(t), testPrefix(t)
	r := NewRegistry(cli, prefix)
	ctx := context.Background()
	const n = 1200
	for i := range n {
		if err := r.PutObject(ctx, testRecord(testKey(i), "t", "u", "b", uint64(i), time.Now(), 0)); err != nil {
			t.Fatal(err)
		}
	}
	w := NewWatcher(cli, prefix, nil)
	w.pageSize = 100
	if _, err := w.load(ctx); err != nil {
		t.Fatal(err)
	}
	if got := w.Snapshot().ObjectCount(); got != n {
		t.Fatalf("loaded %d objects, want %d", got, n)
	}
	seen := 0
	w.Snapshot().RangeObjects("", func(key Key, o *Object) bool { seen++; return true })
	if seen != n {
		t.Fatalf("ranged over %d", seen)
	}
}

func TestWatcherRecoversFromCompaction(t *testing.T) {
	t.Parallel() // an etcd of its own: compaction is etcd-wide
	_, cli := startEtcd(t)
	r := NewRegistry(cli, "")
	ctx := context.Background()
	w := NewWatcher(cli, "", nil)
	rev, err := w.load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Writes the watcher has not seen, then compaction past them.
	if _, err := r.CreateTarget(ctx, validTarget("x")); err != nil {
		t.Fatal(err)
	}
	resp, err := r.CreateTarget(ctx, validTarget("y"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctx, resp.Revision); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	err = w.watch(wctx, rev)
	if err == nil || !strings.Contains(err.Error(), "compacted") {
		t.Fatalf("watch from a compacted revision: %v", err)
	}
	// Run re-reads: both targets arrive.
	done := make(chan struct{})
	go func() { w.Run(wctx); close(done) }()
	eventually(t, 5*time.Second, "targets after compaction", func() bool { return len(w.Snapshot().Targets()) == 2 })
	cancel()
	<-done
}

func TestHeartbeatLeaseExpiryMakesTargetUnhealthy(t *testing.T) {
	t.Parallel()
	cli, prefix := sharedEtcd(t), testPrefix(t)
	r := NewRegistry(cli, prefix)
	ctx := context.Background()
	tg := validTarget("mirror")
	tg.Heartbeat = true
	created, err := r.CreateTarget(ctx, tg)
	if err != nil {
		t.Fatal(err)
	}
	// The prober has found its URL serving: only the heartbeat decides now.
	if err := r.SetHealth(ctx, &pb.TargetHealth{Target: "mirror", TargetUid: created.Uid, Healthy: true}); err != nil {
		t.Fatal(err)
	}
	if err := r.Heartbeat(ctx, "a-missing-one", time.Second); !errors.Is(err, ErrNotFound) {
		t.Fatalf("heartbeat of a missing target: %v", err)
	}
	if _, err := r.CreateTarget(ctx, validTarget("plain")); err != nil {
		t.Fatal(err)
	}
	if err := r.Heartbeat(ctx, "plain", time.Second); !errors.Is(err, ErrNotHeartbeat) {
		t.Fatalf("heartbeat of a plain target: %v", err)
	}
	w := watch(t, cli, prefix)
	healthy := func() bool { m, _ := w.Snapshot().Target("mirror"); return m.Healthy }
	if healthy() {
		t.Fatal("heartbeat target healthy before its first heartbeat")
	}
	if err := r.Heartbeat(ctx, "mirror", 2*time.Second); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "healthy after heartbeat", healthy)
	// A second heartbeat refreshes the same lease.
	if err := r.Heartbeat(ctx, "mirror", 2*time.Second); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	eventually(t, 10*time.Second, "unhealthy after the lease expires", func() bool { return !healthy() })
	if time.Since(start) < time.Second {
		t.Fatalf("went unhealthy after %s, before its lease could expire", time.Since(start))
	}
}

func TestClaimIsGrantedOnceThenAgainAfterExpiry(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name     string
		inFlight int
	}{{"a transaction per claim", 0}, {"grouped claims", 1}} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			testClaimGrantedOnce(t, c.inFlight)
		})
	}
}

func testClaimGrantedOnce(t *testing.T, inFlight int) {
	cli := sharedEtcd(t)
	r := NewRegistry(cli, testPrefix(t))
	r.GroupClaims(inFlight)
	ctx := context.Background()
	key := testKey(7)
	var granted atomic.Int32
	var wg sync.WaitGroup
	tokens := make(chan string, 20)
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok := NewToken()
			ok, err := r.Claim(ctx, &pb.FillClaim{Key: key, Target: "t", AgentId: fmt.Sprint(i), Token: tok}, 2*time.Second)
			if err != nil {
				t.Error(err)
			}
			if ok {
				granted.Add(1)
				tokens <- tok
			}
		}()
	}
	wg.Wait()
	if granted.Load() != 1 {
		t.Fatalf("%d claims granted, want 1", granted.Load())
	}
	winner := <-tokens
	if err := r.AbortFill(ctx, key, "wrong-token"); !errors.Is(err, ErrClaimNotHeld) {
		t.Fatalf("abort with a wrong token: %v", err)
	}
	// Expiry frees it for another agent; the old token no longer completes.
	eventually(t, 10*time.Second, "claim expires", func() bool {
		ok, err := r.Claim(ctx, &pb.FillClaim{Key: key, Target: "t", Token: "second"}, 30*time.Second)
		return err == nil && ok
	})
	if _, _, err := r.HeldClaim(ctx, key, winner); !errors.Is(err, ErrClaimNotHeld) {
		t.Fatalf("an expired claim's token is still held: %v", err)
	}
	_, rev, err := r.HeldClaim(ctx, key, "second")
	if err != nil {
		t.Fatal(err)
	}
	obj := testRecord(key, "t", "u", "b", 1, time.Now(), 0)
	if _, err := r.CompleteFill(ctx, obj, rev-1); !errors.Is(err, ErrClaimNotHeld) {
		t.Fatalf("complete at another claim revision: %v", err)
	}
	if _, err := r.CompleteFill(ctx, obj, rev); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(ctx, r.fillKey(key))
	if err != nil || len(resp.Kvs) != 0 {
		t.Fatalf("claim still there after completion: %v", err)
	}
}

// Serial: it counts the etcd revisions its claims take, which parallel tests would move.
func TestGroupedClaimsKeepEachKeysOwnCompare(t *testing.T) {
	cli := sharedEtcd(t)
	r := NewRegistry(cli, testPrefix(t))
	r.GroupClaims(1)
	ctx := context.Background()
	held := testKey(1000)
	if ok, err := r.Claim(ctx, &pb.FillClaim{Key: held, Target: "t", Token: "first"}, time.Minute); err != nil || !ok {
		t.Fatalf("first claim: %v, %v", ok, err)
	}
	before, err := cli.Get(ctx, "any")
	if err != nil {
		t.Fatal(err)
	}
	// 100 claims: two for each of 40 new keys, and 20 for the held key, all at once.
	const keys = 40
	var wg sync.WaitGroup
	var mu sync.Mutex
	grants := map[string]int{}
	for i := range 100 {
		k := held
		if i < 2*keys {
			k = testKey(i % keys)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ok, err := r.Claim(ctx, &pb.FillClaim{Key: k, Target: "t", Token: NewToken()}, time.Minute)
			if err != nil {
				t.Error(err)
			}
			if ok {
				mu.Lock()
				grants[k]++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for i := range keys {
		if n := grants[testKey(i)]; n != 1 {
			t.Errorf("key %d granted %d times, want 1", i, n)
		}
	}
	if n := grants[held]; n != 0 {
		t.Errorf("a held key granted %d more times", n)
	}
	after, err := cli.Get(ctx, "any")
	if err != nil {
		t.Fatal(err)
	}
	// One revision per transaction: fewer than one per claim when they were grouped.
	if txns := after.Header.Revision - before.Header.Revision; txns >= keys {
		t.Errorf("%d transactions for %d granted claims: not grouped", txns, keys)
	}
	// A claim whose deadline passed is not written and fails no other.
	dead, cancel := context.WithDeadline(ctx, time.Now().Add(-time.Second))
	defer cancel()
	if _, err := r.Claim(dead, &pb.FillClaim{Key: testKey(500), Target: "t", Token: "late"}, time.Minute); err == nil {
		t.Error("a claim past its deadline succeeded")
	}
	if ok, err := r.Claim(ctx, &pb.FillClaim{Key: testKey(500), Target: "t", Token: "on time"}, time.Minute); err != nil || !ok {
		t.Errorf("claim after a late one: %v, %v", ok, err)
	}
}
