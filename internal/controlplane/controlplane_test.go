package controlplane

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/etcdembed"
	"github.com/detourhq/detour/internal/gcsemu"
	"github.com/detourhq/detour/internal/pki"
	"github.com/detourhq/detour/internal/targets"
	"github.com/detourhq/detour/internal/testbed"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// replica is a running control plane and clients of it in each role (mutual TLS with the test
// PKI's operator, agent and mirror certificates).
type replica struct {
	srv    *Server
	ls     Listeners
	served chan error // what Serve returned
	admin  pb.AdminServiceClient
	place  pb.PlacementServiceClient
	mirror pb.PlacementServiceClient
	op     *grpc.ClientConn // the operator's connection
	down   bool             // shut down
}

func (r *replica) addr() string        { return r.ls.Placement.Addr().String() }
func (r *replica) metricsAddr() string { return r.ls.Metrics.Addr().String() }

// adminAddr is where AdminService is served: its own listener, or the placement one.
func (r *replica) adminAddr() string {
	if r.ls.Admin != nil {
		return r.ls.Admin.Addr().String()
	}
	return r.addr()
}

// shutdown shuts the replica down (once) and checks that Serve returned ErrServerClosed.
func (r *replica) shutdown(t *testing.T) {
	t.Helper()
	if r.down {
		return
	}
	r.down = true
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.srv.Shutdown(ctx); err != nil {
		t.Errorf("shutdown: %v", err)
	}
	if err := <-r.served; !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve returned %v after Shutdown, want ErrServerClosed", err)
	}
}

// startEtcd starts an etcd of the test's own: for tests that stop it or reach it through a proxy.
// Others share the package's (sharedEtcd).
func startEtcd(t *testing.T) *etcdembed.Server {
	t.Helper()
	srv, err := etcdembed.Start(context.Background(), etcdembed.Config{Dir: t.TempDir(), PKIDir: etcdPKI(t).Dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	return srv
}

// shared is the package's etcd, started by the first test that asks for it and stopped by
// TestMain. Tests keep apart under prefixes of their own (testPrefix).
var shared struct {
	once sync.Once
	dir  string
	srv  *etcdembed.Server
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.srv != nil {
		shared.srv.Close()
		os.RemoveAll(shared.dir)
	}
	if etcdPKIDir.Dir != "" {
		os.RemoveAll(etcdPKIDir.Dir)
	}
	os.Exit(code)
}

// sharedEtcd is the package's etcd's client URL.
func sharedEtcd(t *testing.T) string {
	t.Helper()
	shared.once.Do(func() {
		if shared.dir, shared.err = os.MkdirTemp("", "controlplane-etcd-"); shared.err != nil {
			return
		}
		shared.srv, shared.err = etcdembed.Start(context.Background(), etcdembed.Config{Dir: shared.dir, PKIDir: etcdPKI(t).Dir})
	})
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	return shared.srv.Endpoint()
}

// sharedEtcdConfig is a client configuration for the package's etcd (its client certificate).
func sharedEtcdConfig(t *testing.T) clientv3.Config {
	t.Helper()
	sharedEtcd(t)
	return shared.srv.ClientConfig()
}

// testPrefix is the test's own etcd prefix (its replicas share it; its subtests too).
func testPrefix(t *testing.T) string {
	name, _, _ := strings.Cut(t.Name(), "/")
	return "/detour-test/" + name + "/"
}

// env is what replicas run against: a GCS emulator reached through the real storage client, and a
// front that serves the emulator's objects at the targets' client-facing URLs and can be made to
// fail the way a CDN or a bucket's permissions fail.
type env struct {
	gcs   *gcsemu.Server
	store *blob.Store
	front *gcsemu.Front
}

func startEnv(t *testing.T) *env {
	t.Helper()
	gcs, err := gcsemu.Start(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(gcs.Stop)
	st, err := blob.NewStore(context.Background(), blob.Options{Endpoint: gcs.Endpoint()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	f, err := gcs.StartFront()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	return &env{gcs: gcs, store: st, front: f}
}

// fastJanitor probes every 100ms, sweeps every 200ms and copies every 100ms, so tests see the
// janitor's effects fast. A probe may take 2s (not the interval, the default): on a loaded machine
// a slow probe would otherwise fail targets that are fine.
var fastJanitor = JanitorConfig{ProbeInterval: 100 * time.Millisecond, ProbeTimeout: 2 * time.Second, SweepInterval: 200 * time.Millisecond,
	ReconcileInterval: time.Hour, CopyInterval: 100 * time.Millisecond, CopyRate: 100, GarbageGrace: 100 * time.Millisecond}

// startReplica starts a control plane on the package's etcd under the test's prefix.
func startReplica(t *testing.T) *replica {
	t.Helper()
	return startReplicaWith(t, Options{WriteTimeout: time.Second})
}

// startReplicaWith starts a control plane on loopback ports with o, waits until it has loaded its
// snapshot and connects to it. Without etcd endpoints or a data directory in o it uses the
// package's etcd (with a data directory, an embedded one of its own there), without a
// prefix the test's, and without a GCS endpoint the test's emulator.
func startReplicaWith(t *testing.T, o Options) *replica {
	t.Helper()
	r := serveReplica(t, o)
	select {
	case <-r.srv.Ready():
	case err := <-r.served:
		t.Fatalf("Serve: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("no snapshot loaded within 20s")
	}
	return r
}

// serveReplica builds a control plane as startReplicaWith does and serves it, without waiting for
// its snapshot.
func serveReplica(t *testing.T, o Options) *replica {
	t.Helper()
	if len(o.EtcdEndpoints) == 0 && o.DataDir == "" {
		o.EtcdEndpoints = []string{sharedEtcd(t)}
	}
	if o.DataDir == "" {
		o.DataDir = t.TempDir() // where a copy of the external etcd's database is written
	}
	if o.EtcdPrefix == "" {
		o.EtcdPrefix = testPrefix(t)
	}
	if o.GCSEndpoint == "" {
		o.GCSEndpoint = sharedEnv(t).gcs.Endpoint()
	}
	if o.Janitor == (JanitorConfig{}) {
		o.Janitor = fastJanitor
	}
	if o.RecordEncoding == "" {
		// The format this release reads and the embedded etcd writes; on an external etcd the
		// default is compact for mixed fleets (TestRecordEncodingDefaults).
		o.RecordEncoding = "home-ref"
	}
	o.Listen, o.MetricsListen = "127.0.0.1:0", "127.0.0.1:0"
	if o.Log == nil {
		o.Log = testbed.Log(t) // printed if the test fails
	}
	dev := testbed.PKI(t)
	if o.TLS == (pki.Files{}) && !o.Insecure {
		o.TLS = pki.Files{Cert: dev.ControlPlane.Cert, Key: dev.ControlPlane.Key, CA: dev.CA.CA}
	}
	if o.EtcdTLS == (pki.Files{}) {
		o.EtcdTLS = etcdPKI(t).Client
	}
	srv, err := New(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	ls, err := srv.Listen()
	if err != nil {
		srv.Shutdown(context.Background())
		t.Fatal(err)
	}
	r := &replica{srv: srv, ls: ls, served: make(chan error, 1)}
	go func() { r.served <- srv.Serve(ls) }()
	t.Cleanup(func() { r.shutdown(t) })
	op := testbed.Dial(t, r.adminAddr(), dev.Operator)
	r.admin, r.op = pb.NewAdminServiceClient(op), op
	r.place = pb.NewPlacementServiceClient(testbed.Dial(t, r.addr(), dev.Agent))
	r.mirror = pb.NewPlacementServiceClient(testbed.Dial(t, r.addr(), dev.Mirror))
	return r
}

var envs sync.Map // top-level test name → *env

// sharedEnv is the test's env (shared by its subtests), started on first use.
func sharedEnv(t *testing.T) *env {
	t.Helper()
	name, _, _ := strings.Cut(t.Name(), "/")
	if e, ok := envs.Load(name); ok {
		return e.(*env)
	}
	e := startEnv(t)
	envs.Store(name, e)
	t.Cleanup(func() { envs.Delete(name) })
	return e
}

// target is a registration whose bucket exists in the test's emulator and whose objects are
// served at the front.
func target(t *testing.T, name, region string) *pb.Target {
	e := sharedEnv(t)
	bucket := "bucket-" + name
	e.gcs.CreateBucket(bucket)
	base := e.front.PublicURL(bucket)
	return &pb.Target{Name: name, Protocol: "http", Uris: []string{base}, Region: region, Weight: 1,
		Store:   &pb.GcsStore{Bucket: bucket, Prefix: "hg/"},
		UrlForm: &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: base}}}
}

// createTargets registers targets and waits until the prober has found each healthy.
func createTargets(t *testing.T, r *replica, ts ...*pb.Target) {
	t.Helper()
	ctx := context.Background()
	for _, tg := range ts {
		if _, err := r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: tg}); err != nil {
			t.Fatal(err)
		}
	}
	for _, tg := range ts {
		waitHealth(t, r, tg.Name, true)
	}
}

func waitHealth(t *testing.T, r *replica, name string, healthy bool) {
	t.Helper()
	eventually(t, 10*time.Second, fmt.Sprintf("target %s healthy=%v", name, healthy), func() bool {
		got, err := r.admin.GetTarget(context.Background(), &pb.GetTargetRequest{Name: name})
		return err == nil && got.Target.Healthy == healthy
	})
}

func key(i int) string { return fmt.Sprintf("%064x", 0xabc000+i) }

func code(err error) codes.Code { return status.Code(err) }

var eventually = testbed.Eventually

// upload stores data where a grant says, as an agent does, and returns what to report.
func upload(t *testing.T, g *pb.FillGrant, k string, data []byte) blob.Result {
	t.Helper()
	u := sharedEnv(t).store.Create(context.Background(), g.Bucket, g.ObjectName, g.MediaType, k)
	if _, err := u.Write(data); err != nil {
		t.Fatal(err)
	}
	res, err := u.Commit()
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func report(k string, g *pb.FillGrant, res blob.Result) *pb.ReportFillRequest {
	return &pb.ReportFillRequest{Key: k, Target: g.Target, Token: g.Token, Size: res.Size, MediaType: g.MediaType,
		Sha256: res.SHA256, Sha1: res.SHA1, ObjectName: g.ObjectName, Crc32C: res.CRC32C, Generation: res.Generation}
}

// grant asks until Place grants a fill of k.
func grant(t *testing.T, r *replica, k string, accepted []string, region string) *pb.FillGrant {
	t.Helper()
	var resp *pb.PlaceResponse
	eventually(t, 5*time.Second, "a fill grant", func() bool {
		var err error
		resp, err = r.place.Place(context.Background(), &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: accepted, AgentRegion: region, AgentId: "a1"})
		if err != nil {
			t.Fatal(err)
		}
		return resp.Fill != nil
	})
	return resp.Fill
}

// fill runs one Place → upload → ReportFill cycle with content derived from k and returns the grant
// and the stored bytes.
func fill(t *testing.T, r *replica, k string, accepted []string, region string) (*pb.FillGrant, []byte) {
	t.Helper()
	g := grant(t, r, k, accepted, region)
	data := []byte(strings.Repeat("content of "+k+"\n", 60))
	if _, err := r.place.ReportFill(context.Background(), report(k, g, upload(t, g, k, data))); err != nil {
		t.Fatal(err)
	}
	return g, data
}

func TestAdminAPIStatusCodes(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	ctx := context.Background()
	created, err := r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: target(t, "us-a", "us")})
	if err != nil {
		t.Fatal(err)
	}
	if created.Target.Revision == 0 || created.Target.State != pb.TargetState_TARGET_STATE_ACTIVE || created.Target.Uid == "" {
		t.Fatalf("created %v", created.Target)
	}
	waitHealth(t, r, "us-a", true)
	_, err = r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: target(t, "us-a", "us")})
	if code(err) != codes.AlreadyExists {
		t.Fatalf("duplicate create: %v", err)
	}
	bad := target(t, "us-b", "us")
	bad.Uris = []string{"ftp://x/"}
	_, err = r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: bad})
	if code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "target.uris[0]") {
		t.Fatalf("invalid create: %v", err)
	}
	if _, err := r.admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "us-b"}); code(err) != codes.NotFound {
		t.Fatalf("half-written registration visible: %v", err)
	}
	// Read-your-writes on the same replica.
	list, err := r.admin.ListTargets(ctx, &pb.ListTargetsRequest{})
	if err != nil || len(list.Targets) != 1 || list.Targets[0].Name != "us-a" {
		t.Fatalf("list: %v %v", list, err)
	}
	uid := created.Target.Uid
	upd := created.Target
	upd.Weight = 3
	upd.Uid = "forged"
	if _, err := r.admin.UpdateTarget(ctx, &pb.UpdateTargetRequest{Target: upd}); err != nil {
		t.Fatal(err)
	}
	upd.Weight = 4 // same, now stale, revision
	if _, err := r.admin.UpdateTarget(ctx, &pb.UpdateTargetRequest{Target: upd}); code(err) != codes.FailedPrecondition {
		t.Fatalf("stale update: %v", err)
	}
	got, err := r.admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "us-a"})
	if err != nil || got.Target.Weight != 3 || got.Target.Uid != uid {
		t.Fatalf("get after updates (the uid is the server's): %v %v", got, err)
	}
	st, err := r.admin.SetTargetState(ctx, &pb.SetTargetStateRequest{Name: "us-a", State: pb.TargetState_TARGET_STATE_DRAINING})
	if err != nil || st.Target.State != pb.TargetState_TARGET_STATE_DRAINING {
		t.Fatalf("drain: %v", err)
	}
	if _, err := r.admin.SetTargetState(ctx, &pb.SetTargetStateRequest{Name: "nope", State: pb.TargetState_TARGET_STATE_DRAINING}); code(err) != codes.NotFound {
		t.Fatalf("drain missing: %v", err)
	}
	if _, err := r.admin.SetTargetState(ctx, &pb.SetTargetStateRequest{Name: "us-a"}); code(err) != codes.InvalidArgument {
		t.Fatalf("state unspecified: %v", err)
	}
	if _, err := r.admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: &pb.Policy{FillClaimTtl: durationpb.New(time.Millisecond)}}); code(err) != codes.InvalidArgument ||
		!strings.Contains(err.Error(), "policy.fill_claim_ttl") {
		t.Fatalf("bad policy: %v", err)
	}
	pol, err := r.admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: &pb.Policy{MinRedirectBytes: 1000}})
	if err != nil {
		t.Fatal(err)
	}
	if g, err := r.admin.GetPolicy(ctx, &pb.GetPolicyRequest{}); err != nil || g.Policy.MinRedirectBytes != 1000 || g.Policy.Revision != pol.Policy.Revision {
		t.Fatalf("get policy: %v %v", g, err)
	}
	if _, err := r.admin.DeleteObjects(ctx, &pb.DeleteObjectsRequest{Key: "short"}); code(err) != codes.InvalidArgument {
		t.Fatalf("bad key: %v", err)
	}
	if _, err := r.admin.DeleteTarget(ctx, &pb.DeleteTargetRequest{Name: "us-a"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "us-a"}); code(err) != codes.NotFound {
		t.Fatalf("get after delete: %v", err)
	}
}

func TestPlaceRedirectsOnlyVerifiedObjects(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	ctx := context.Background()
	createTargets(t, r, target(t, "us-a", "us"), target(t, "eu-a", "eu"))
	setPolicy(t, r, func(p *pb.Policy) { p.MinOccurrences = 1 }) // this test is about the first miss
	acc := []string{"us-a", "eu-a"}
	k := key(1)
	first, err := r.place.Place(ctx, &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: acc, AgentRegion: "us", AgentId: "a1"})
	if err != nil {
		t.Fatal(err)
	}
	if first.Result != pb.PlaceResult_PLACE_RESULT_INLINE || first.Fill == nil || first.Fill.Target != "us-a" ||
		first.Fill.Bucket != "bucket-us-a" || first.Fill.ObjectName != "hg/"+k || first.Fill.MediaType != MediaTypeCBOR || first.Reason != "fill" {
		t.Fatalf("first place: %v", first)
	}
	// While the claim is held (not yet READY), others get plain inline.
	second, _ := r.place.Place(ctx, &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: acc, AgentRegion: "us"})
	if second.Result != pb.PlaceResult_PLACE_RESULT_INLINE || second.Fill != nil || second.Reason != "fill_in_progress" {
		t.Fatalf("place during fill: %v", second)
	}
	// Malformed reports are refused, naming the field, and change nothing (the claim stays).
	for field, req := range map[string]*pb.ReportFillRequest{
		"sha256":     {Key: k, Target: "us-a", Token: first.Fill.Token, Size: 1, MediaType: MediaTypeCBOR, Sha256: []byte{1}, Sha1: make([]byte, 20), Generation: 1},
		"size":       {Key: k, Target: "us-a", Token: first.Fill.Token, MediaType: MediaTypeCBOR, Sha256: make([]byte, 32), Sha1: make([]byte, 20), Generation: 1},
		"generation": {Key: k, Target: "us-a", Token: first.Fill.Token, Size: 1, MediaType: MediaTypeCBOR, Sha256: make([]byte, 32), Sha1: make([]byte, 20)},
		"key":        {Key: "x", Target: "us-a", Token: first.Fill.Token},
	} {
		if _, err := r.place.ReportFill(ctx, req); code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), field) {
			t.Fatalf("report with bad %s: %v", field, err)
		}
	}
	data := []byte(strings.Repeat("manifest revision bytes\n", 200))
	res := upload(t, first.Fill, k, data)
	forged := report(k, first.Fill, res)
	forged.Token = "forged"
	if _, err := r.place.ReportFill(ctx, forged); code(err) != codes.FailedPrecondition {
		t.Fatalf("report with a forged token: %v", err)
	}
	if _, err := r.place.ReportFill(ctx, report(k, first.Fill, res)); err != nil {
		t.Fatal(err)
	}
	var third *pb.PlaceResponse
	eventually(t, 5*time.Second, "redirect after the fill is verified", func() bool {
		third, _ = r.place.Place(ctx, &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: acc, AgentRegion: "eu"})
		return third.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT
	})
	if third.Target != "us-a" || third.Location.Size != uint64(len(data)) || string(third.Location.Sha256) != string(res.SHA256) ||
		third.Location.MediaType != MediaTypeCBOR {
		t.Fatalf("redirect: %v", third)
	}
	// The location serves exactly the stored bytes.
	if got := httpGet(t, third.Location.Url); got != string(data) {
		t.Fatalf("the location serves %d bytes, not the %d stored", len(got), len(data))
	}
	// A client that does not accept us-a does not get sent there.
	other, _ := r.place.Place(ctx, &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: []string{"eu-a"}, AgentRegion: "eu"})
	if other.Result != pb.PlaceResult_PLACE_RESULT_INLINE || other.Fill.GetTarget() != "eu-a" {
		t.Fatalf("client accepting only eu-a: %v", other)
	}
	objs, err := r.admin.ListObjects(ctx, &pb.ListObjectsRequest{Target: "us-a"})
	if err != nil || len(objs.Objects) != 1 || objs.Objects[0].Key != k || objs.Objects[0].Size != uint64(len(data)) ||
		objs.Objects[0].Bucket != "bucket-us-a" || objs.Objects[0].Generation != res.Generation || objs.Objects[0].Crc32C != res.CRC32C ||
		objs.Objects[0].Expires == nil {
		t.Fatalf("list objects: %v %v", objs, err)
	}
	if _, err := r.place.Place(ctx, &pb.PlaceRequest{Key: "nothex", Command: "x"}); code(err) != codes.InvalidArgument {
		t.Fatalf("bad key: %v", err)
	}
	// Metrics count decisions by result and reason.
	body := httpGet(t, "http://"+r.metricsAddr()+"/metrics")
	for _, want := range []string{`detour_place_decisions_total{reason="fill",result="inline"} 2`,
		`detour_place_decisions_total{reason="ready",result="redirect"}`, "detour_place_duration_seconds_bucket", "detour_snapshot_revision",
		`detour_target_healthy{target="us-a"} 1`, `detour_fill_verify_duration_seconds_count{full="false"}`} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s in\n%s", want, body)
		}
	}
}

func httpGet(t *testing.T, u string) string {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: HTTP %d", u, resp.StatusCode)
	}
	return string(b)
}

// A key is filled only on its min_occurrences-th miss; the misses before cost no etcd write.
// Serial: it checks that etcd's revision under its prefix does not move, and a janitor's
// verdict written late under a parallel load would move it.
func TestFillIsGrantedOnlyOnTheNthMiss(t *testing.T) {
	r := startReplica(t)
	createTargets(t, r, target(t, "us-a", "us"))
	acc := []string{"us-a"}
	misses := func(k string, n int) (reasons []string) {
		for range n {
			resp, err := r.place.Place(context.Background(), &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: acc, AgentRegion: "us", AgentId: "a1"})
			if err != nil {
				t.Fatal(err)
			}
			if resp.Fill != nil {
				reasons = append(reasons, "fill")
				continue
			}
			reasons = append(reasons, resp.Reason)
		}
		return reasons
	}
	rev := func() int64 { return r.srv.svc.w.Snapshot().Revision }
	before := rev()
	if got := misses(key(1), 1); got[0] != ReasonNotAdmitted {
		t.Fatalf("first miss under the default policy: %v, want %s", got, ReasonNotAdmitted)
	}
	if got := rev(); got != before {
		t.Errorf("an un-admitted miss wrote to etcd (revision %d → %d)", before, got)
	}
	if got := misses(key(1), 1); got[0] != "fill" {
		t.Fatalf("second miss under the default policy: %v, want a fill", got)
	}
	for _, c := range []struct {
		n    uint32
		want string
	}{
		{1, "fill"},
		{3, ReasonNotAdmitted + " " + ReasonNotAdmitted + " fill"},
	} {
		setPolicy(t, r, func(p *pb.Policy) { p.MinOccurrences = c.n })
		if got := strings.Join(misses(key(10+int(c.n)), len(strings.Fields(c.want))), " "); got != c.want {
			t.Errorf("min_occurrences %d: %s, want %s", c.n, got, c.want)
		}
	}
}

func TestFillClaimGrantedOnceFor20ConcurrentPlaces(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	ctx := context.Background()
	createTargets(t, r, target(t, "us-a", "us"))
	if _, err := r.admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: &pb.Policy{FillClaimTtl: durationpb.New(5 * time.Second)}}); err != nil {
		t.Fatal(err)
	}
	k := key(2)
	eventually(t, 5*time.Second, "policy in the snapshot", func() bool {
		p, err := r.admin.GetPolicy(ctx, &pb.GetPolicyRequest{})
		return err == nil && p.Policy.FillClaimTtl != nil
	})
	round := func() int {
		var mu sync.Mutex
		grants := 0
		var wg sync.WaitGroup
		for i := range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := r.place.Place(ctx, &pb.PlaceRequest{Key: k, Command: "filedata", AcceptedTargets: []string{"us-a"},
					AgentRegion: "us", AgentId: fmt.Sprint("agent-", i)})
				if err != nil {
					t.Error(err)
					return
				}
				if resp.Fill != nil {
					mu.Lock()
					grants++
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		return grants
	}
	if n := round(); n != 1 {
		t.Fatalf("%d fill grants for 20 concurrent places, want 1", n)
	}
	// The agent "dies": after the claim's TTL another agent may fill.
	eventually(t, 10*time.Second, "a new grant after the claim expires", func() bool {
		resp, err := r.place.Place(ctx, &pb.PlaceRequest{Key: k, Command: "filedata", AcceptedTargets: []string{"us-a"}, AgentRegion: "us"})
		return err == nil && resp.Fill != nil
	})
}

func TestReplicasShareStateAndSurviveRestart(t *testing.T) {
	t.Parallel()
	a := startReplica(t)
	b := startReplica(t)
	ctx := context.Background()
	createTargets(t, a, target(t, "us-a", "us"))
	start := time.Now()
	eventually(t, 5*time.Second, "replica b sees a's target", func() bool {
		_, err := b.admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "us-a"})
		return err == nil
	})
	t.Logf("replica b saw a's write after %s", time.Since(start))
	k := key(3)
	fill(t, b, k, []string{"us-a"}, "us")
	req := &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: []string{"us-a"}, AgentRegion: "us"}
	var fromA *pb.PlaceResponse
	eventually(t, 5*time.Second, "replica a redirects after b's fill", func() bool {
		fromA, _ = a.place.Place(ctx, req)
		return fromA.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT
	})
	a.shutdown(t)
	c := startReplica(t)
	fromC, err := c.place.Place(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if fromC.Result != fromA.Result || fromC.Location.Url != fromA.Location.Url || fromC.Target != fromA.Target {
		t.Fatalf("restarted replica answers %v, before %v", fromC, fromA)
	}
	// With an external etcd and Options' defaults, c read its records from a copy of etcd's
	// database (written in its data directory and removed), not by range.
	metrics := "http://" + c.metricsAddr() + "/metrics"
	if got := testbed.Metric(t, metrics, "detour_etcd_database_copies_loaded_total"); got != 1 {
		t.Errorf("detour_etcd_database_copies_loaded_total = %v, want 1", got)
	}
	if got := testbed.Metric(t, metrics, "detour_etcd_database_copies_declined_total"); got != 0 {
		t.Errorf("detour_etcd_database_copies_declined_total = %v, want 0", got)
	}
	if left, _ := filepath.Glob(filepath.Join(c.srv.o.DataDir, "etcd-db.copy*")); len(left) != 0 {
		t.Errorf("the copy is left behind: %v", left)
	}
}

func TestPlaceAnswersWhileEtcdIsDown(t *testing.T) {
	t.Parallel()
	etcd := startEtcd(t)
	r := startReplicaWith(t, Options{EtcdEndpoints: []string{etcd.Endpoint()}, WriteTimeout: time.Second})
	ctx := context.Background()
	createTargets(t, r, target(t, "us-a", "us"))
	k := key(4)
	fill(t, r, k, []string{"us-a"}, "us")
	eventually(t, 5*time.Second, "object ready", func() bool {
		resp, _ := r.place.Place(ctx, &pb.PlaceRequest{Key: k, Command: "m", AcceptedTargets: []string{"us-a"}, AgentRegion: "us"})
		return resp.GetResult() == pb.PlaceResult_PLACE_RESULT_REDIRECT
	})
	etcd.Crash() // a crash: Close would first wait seconds for the connected clients to go
	pctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	resp, err := r.place.Place(pctx, &pb.PlaceRequest{Key: k, Command: "m", AcceptedTargets: []string{"us-a"}, AgentRegion: "us"})
	if err != nil || resp.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatalf("place with etcd down: %v %v", resp, err)
	}
	// A miss still answers (inline, no fill: the claim cannot be recorded).
	miss, err := r.place.Place(pctx, &pb.PlaceRequest{Key: key(5), Command: "m", AcceptedTargets: []string{"us-a"}, AgentRegion: "us"})
	if err != nil || miss.Result != pb.PlaceResult_PLACE_RESULT_INLINE || miss.Fill != nil {
		t.Fatalf("miss with etcd down: %v %v", miss, err)
	}
	if _, err := r.admin.ListTargets(ctx, &pb.ListTargetsRequest{}); err != nil {
		t.Fatalf("read with etcd down: %v", err)
	}
	start := time.Now()
	_, err = r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: target(t, "eu-a", "eu")})
	if code(err) != codes.Unavailable {
		t.Fatalf("write with etcd down: %v", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("write took %s to fail", d)
	}
}

func TestWatchTargetsStreamsFullSetThenChanges(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	createTargets(t, r, target(t, "us-a", "us"))
	stream, err := r.place.WatchTargets(ctx, &pb.WatchTargetsRequest{AgentRegion: "us"})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil || len(first.Targets) != 1 || first.Revision == 0 || !first.Targets[0].Healthy {
		t.Fatalf("first message: %v %v", first, err)
	}
	// recvUntil reads the stream until cond holds for a message.
	recvUntil := func(what string, cond func(*pb.WatchTargetsResponse) bool) *pb.WatchTargetsResponse {
		t.Helper()
		for {
			msg, err := stream.Recv()
			if err != nil {
				t.Fatalf("waiting for %s: %v", what, err)
			}
			if cond(msg) {
				return msg
			}
		}
	}
	mirrorHealthy := func(m *pb.WatchTargetsResponse) (bool, bool) {
		for _, tg := range m.Targets {
			if tg.Name == "mirror" {
				return true, tg.Healthy
			}
		}
		return false, false
	}
	mirror := target(t, "mirror", "eu")
	mirror.Heartbeat = true
	if _, err := r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: mirror}); err != nil {
		t.Fatal(err)
	}
	next := recvUntil("the new target", func(m *pb.WatchTargetsResponse) bool { seen, _ := mirrorHealthy(m); return seen })
	if next.Revision <= first.Revision {
		t.Fatalf("revision did not move: %d → %d", first.Revision, next.Revision)
	}
	// Its probe passes, but without a heartbeat a heartbeat target stays unhealthy. (Two passed
	// probes: the first one's verdict is written before the second probe starts.)
	eventually(t, 10*time.Second, "the mirror probed", func() bool {
		return metric(t, r, "detour_target_probes_total", `target="mirror"`, `result="ok"`) >= 2
	})
	got, err := r.admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "mirror"})
	if err != nil || got.Target.Healthy || got.Target.UnhealthyReason != "heartbeat expired" {
		t.Fatalf("heartbeat target before any heartbeat: %v %v", got, err)
	}
	if _, err := r.mirror.Heartbeat(ctx, &pb.HeartbeatRequest{Target: "mirror", Ttl: durationpb.New(2 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	recvUntil("the mirror healthy after its heartbeat", func(m *pb.WatchTargetsResponse) bool { _, h := mirrorHealthy(m); return h })
	if _, err := r.mirror.Heartbeat(ctx, &pb.HeartbeatRequest{Target: "us-a"}); code(err) != codes.FailedPrecondition {
		t.Fatalf("heartbeat of a non-heartbeat target: %v", err)
	}
}

func TestReflectionAndHealthAreServed(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	conn := r.op
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.Name)
	}
	got := strings.Join(names, " ")
	for _, want := range []string{"detour.v1.PlacementService", "detour.v1.AdminService", "grpc.health.v1.Health"} {
		if !strings.Contains(got, want) {
			t.Errorf("reflection lists %q, missing %s", got, want)
		}
	}
	h, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || h.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v %v", h, err)
	}
}

// Three etcd members: losing one keeps everything working; losing quorum keeps Place and reads
// answering from the snapshot while writes fail with Unavailable; quorum back, writes work again.
func TestThreeMemberEtcdSurvivesAMemberAndRidesOutQuorumLoss(t *testing.T) {
	t.Parallel()
	members, err := etcdembed.StartCluster(context.Background(), []string{t.TempDir(), t.TempDir(), t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	var endpoints []string
	for _, m := range members {
		endpoints = append(endpoints, m.Endpoint())
		t.Cleanup(m.Close)
	}
	r := startReplicaWith(t, Options{EtcdEndpoints: endpoints, EtcdTLS: members[0].PKI().Client, WriteTimeout: 2 * time.Second})
	ctx := context.Background()
	createTargets(t, r, target(t, "us-a", "us"))
	k := key(9)
	fill(t, r, k, []string{"us-a"}, "us")
	loaded := r.srv.w.LoadBegan()

	members[0].Crash() // lost without handing over leadership
	// Quorum holds: writes go on (the client fails over to the remaining members).
	eventually(t, 10*time.Second, "a write with one member down", func() bool {
		_, err := r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: target(t, "eu-a", "eu")})
		return err == nil || code(err) == codes.AlreadyExists
	})
	// and the watch follows (it may have been on the crashed member): the read below, without
	// quorum, is served from the snapshot as it is when quorum goes.
	eventually(t, 10*time.Second, "the snapshot holds the write", func() bool {
		list, err := r.admin.ListTargets(ctx, &pb.ListTargetsRequest{})
		return err == nil && len(list.Targets) == 2
	})
	members[1].Close()
	resp, err := r.place.Place(ctx, &pb.PlaceRequest{Key: k, Command: "m", AcceptedTargets: []string{"us-a"}, AgentRegion: "us"})
	if err != nil || resp.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatalf("place without quorum: %v %v", resp, err)
	}
	if list, err := r.admin.ListTargets(ctx, &pb.ListTargetsRequest{}); err != nil || len(list.Targets) != 2 {
		t.Fatalf("read without quorum: %v %v", list, err)
	}
	if _, err := r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: target(t, "ap-a", "ap")}); code(err) != codes.Unavailable {
		t.Fatalf("write without quorum: %v", err)
	}
	// A member comes back on its data: quorum again, writes succeed, the snapshot follows.
	back, err := etcdembed.Start(ctx, members[1].Config())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(back.Close)
	eventually(t, 20*time.Second, "a write after quorum returns", func() bool {
		_, err := r.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: target(t, "ap-a", "ap")})
		return err == nil || code(err) == codes.AlreadyExists
	})
	eventually(t, 10*time.Second, "the snapshot follows again", func() bool {
		list, err := r.admin.ListTargets(ctx, &pb.ListTargetsRequest{})
		return err == nil && len(list.Targets) == 3
	})
	// by following etcd's history on from where it stopped (the watch ended when quorum went),
	// not by reading every record again.
	if again := r.srv.w.LoadBegan(); !again.Equal(loaded) {
		t.Fatalf("the replica read everything again at %s after quorum returned (first read at %s)", again, loaded)
	}
}

func TestExpiredObjectsAreSweptAndListsPage(t *testing.T) {
	t.Parallel()
	r := startReplicaWith(t, Options{})
	ctx := context.Background()
	createTargets(t, r, target(t, "us-a", "us"))
	for i := range 5 {
		fill(t, r, key(100+i), []string{"us-a"}, "us")
	}
	// Pages of 2 over 5 keys: 2, 2, 1, in key order, no repeats.
	var seen []string
	token := ""
	for page := 0; ; page++ {
		resp, err := r.admin.ListObjects(ctx, &pb.ListObjectsRequest{PageSize: 2, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range resp.Objects {
			seen = append(seen, o.Key)
		}
		if resp.NextPageToken == "" {
			break
		}
		token = resp.NextPageToken
		if page > 5 {
			t.Fatal("pagination does not end")
		}
	}
	if len(seen) != 5 || seen[0] != key(100) || seen[4] != key(104) {
		t.Fatalf("paged keys %v", seen)
	}
	// Objects filled under a 1s object TTL expire: Place stops redirecting at once (time is an
	// input to placement) and the sweeper removes them from the index.
	pol, _ := r.admin.GetPolicy(ctx, &pb.GetPolicyRequest{})
	pol.Policy.ObjectTtl = durationpb.New(time.Second)
	if _, err := r.admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: pol.Policy}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.admin.GetPolicy(ctx, &pb.GetPolicyRequest{}); err != nil {
		t.Fatal(err)
	}
	short := key(200)
	g, _ := fill(t, r, short, []string{"us-a"}, "us")
	eventually(t, 5*time.Second, "the short-lived object listed", func() bool {
		resp, err := r.admin.ListObjects(ctx, &pb.ListObjectsRequest{KeyPrefix: short})
		return err == nil && len(resp.Objects) == 1 && resp.Objects[0].Expires != nil
	})
	eventually(t, 5*time.Second, "expired object swept", func() bool {
		resp, err := r.admin.ListObjects(ctx, &pb.ListObjectsRequest{KeyPrefix: short})
		return err == nil && len(resp.Objects) == 0
	})
	resp, err := r.place.Place(ctx, &pb.PlaceRequest{Key: short, Command: "m", AcceptedTargets: []string{"us-a"}, AgentRegion: "us"})
	if err != nil || resp.Result != pb.PlaceResult_PLACE_RESULT_INLINE {
		t.Fatalf("place after expiry: %v %v", resp, err)
	}
	if list, _ := r.admin.ListObjects(ctx, &pb.ListObjectsRequest{}); len(list.Objects) != 5 {
		t.Fatalf("the sweep removed objects before their expiry: %d left", len(list.Objects))
	}
	// The expired object's bytes are deleted from the bucket too.
	eventually(t, 5*time.Second, "expired bytes deleted", func() bool {
		_, err := sharedEnv(t).gcs.Object(g.Bucket, g.ObjectName)
		return err != nil
	})
}

// Records name their home by default only where no older replica can share the prefix: with the
// embedded etcd. With an external one the default is compact until an operator says otherwise,
// since a replica of a release before home records would skip those records and delete their
// bytes as orphans.
func TestRecordEncodingDefaults(t *testing.T) {
	for _, c := range []struct {
		name     string
		embedded bool
		want     targets.RecordEncoding
	}{
		{"", true, targets.EncodingHomeRef},
		{"", false, targets.EncodingCompact},
		{"home-ref", false, targets.EncodingHomeRef},
		{"compact", true, targets.EncodingCompact},
		{"proto", false, targets.EncodingProto},
	} {
		if got, err := recordEncoding(c.name, c.embedded); err != nil || got != c.want {
			t.Errorf("%q (embedded %v): %v, %v; want %v", c.name, c.embedded, got, err, c.want)
		}
	}
	if _, err := recordEncoding("cbor", false); err == nil || !strings.Contains(err.Error(), "cbor") {
		t.Errorf("an unknown encoding: %v", err)
	}
}
