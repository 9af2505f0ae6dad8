// Command integrityload measures what integrity costs: the verification a fill report goes through
// before its object is READY (attributes only, and full re-read), how long a dead store keeps
// being redirected to, and how fast the reconciler checks a bucket against the index. Every
// figure is printed next to a baseline measured in the same run on the same servers.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"cloud.google.com/go/storage"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/bench/loadstat"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/controlplane"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/gcsemu"
	"github.com/detourhq/detour/internal/targets"
)

var (
	reports     = flag.Int("reports", 300, "fill reports per verification mode")
	size        = flag.Int("size", 256<<10, "bytes per filled object")
	concurrency = flag.Int("concurrency", 8, "concurrent reports")
	trials      = flag.Int("trials", 2, "dead-store detections per fault")
	reconcileN  = flag.Int("reconcile-objects", 5000, "objects in the bucket the reconciler checks")
	changes     = flag.Int("changes", 20, "objects changed behind Detour's back per kind of change (overwrite, truncate, delete)")
)

type bench struct {
	ctx   context.Context
	gcs   *gcsemu.Server
	front *gcsemu.Front
	store *blob.Store
	quiet *slog.Logger
}

func main() {
	flag.Parse()
	b := &bench{ctx: context.Background(), quiet: slog.New(slog.NewTextHandler(io.Discard, nil))}
	var err error
	b.gcs, err = gcsemu.Start(0)
	check(err)
	defer b.gcs.Stop()
	b.front, err = b.gcs.StartFront()
	check(err)
	defer b.front.Close()
	b.store, err = blob.NewStore(b.ctx, blob.Options{Endpoint: b.gcs.Endpoint()})
	check(err)
	defer b.store.Close()
	host, _ := os.Hostname()
	fmt.Printf("integrityload: host %s, %d CPUs, %s\n\n", host, runtime.NumCPU(), time.Now().UTC().Format("2006-01-02"))
	b.verification()
	b.detection()
	b.changed()
	b.reconciler()
}

// node is one control plane with its own embedded etcd and a target on the shared emulator.
type node struct {
	cp    *devstack.ControlPlane
	place pb.PlacementServiceClient
	admin pb.AdminServiceClient
	cli   *clientv3.Client
	t     *pb.Target
	dir   string
}

func (b *bench) start(name string, o controlplane.Options) *node {
	dir, err := os.MkdirTemp("", "integrityload")
	check(err)
	// Plaintext: these figures are about verification and probing, not transport.
	o.Listen, o.DataDir, o.GCSEndpoint, o.Log, o.Insecure = "127.0.0.1:0", dir, b.gcs.Endpoint(), b.quiet, true
	cp, err := devstack.StartControlPlane(b.ctx, o)
	check(err)
	conn, err := grpc.NewClient(cp.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	check(err)
	n := &node{cp: cp, place: pb.NewPlacementServiceClient(conn), admin: pb.NewAdminServiceClient(conn), dir: dir}
	n.cli, err = clientv3.New(cp.EmbeddedEtcd().ClientConfig())
	check(err)
	bucket := "bucket-" + name
	b.gcs.CreateBucket(bucket)
	public := b.front.PublicURL(bucket)
	resp, err := n.admin.CreateTarget(b.ctx, &pb.CreateTargetRequest{Target: &pb.Target{Name: name, Protocol: "http",
		Uris: []string{public}, Region: "us", Weight: 1, Store: &pb.GcsStore{Bucket: bucket, Prefix: "hg/"},
		UrlForm: &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: public}}}})
	check(err)
	n.t = resp.Target
	return n
}

func (n *node) stop() {
	n.cli.Close()
	_ = n.cp.Shutdown(context.Background())
	os.RemoveAll(n.dir)
}

func key(run, i int) string { return fmt.Sprintf("%032x%032x", run+1, i+1) }

// grant asks until a fill is granted (the target must first pass its probe).
func (n *node) grant(k string) *pb.FillGrant {
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		resp, err := n.place.Place(context.Background(), &pb.PlaceRequest{Key: k, Command: "filesdata",
			AcceptedTargets: []string{n.t.Name}, AgentRegion: "us", AgentId: "bench"})
		check(err)
		if resp.Fill != nil {
			return resp.Fill
		}
	}
	check(fmt.Errorf("no fill granted for %s", k))
	return nil
}

func (b *bench) upload(g *pb.FillGrant, k string, data []byte) blob.Result {
	u := b.store.Create(b.ctx, g.Bucket, g.ObjectName, g.MediaType, k)
	_, err := u.Write(data)
	check(err)
	res, err := u.Commit()
	check(err)
	return res
}

// verification times ReportFill, which verifies each object against the store before it is READY,
// with attribute checks (the default) and with a full re-read; the baseline is a Place miss on the
// same control plane, one etcd transaction, which is what a report cost before verification.
func (b *bench) verification() {
	fmt.Printf("== fill verification: %d reports of %d KiB objects per mode, concurrency %d\n", *reports, *size>>10, *concurrency)
	fmt.Printf("%-22s  %-50s  %-50s  %s\n", "mode", "ReportFill", "baseline: Place miss (one etcd write)", "ratio")
	data := make([]byte, *size)
	for i := range data {
		data[i] = byte(i*7 + i>>9)
	}
	for run, mode := range []struct {
		name string
		full float64
	}{{"attrs (default)", 0}, {"full re-read", 1}} {
		n := b.start(fmt.Sprintf("verify%d", run), controlplane.Options{VerifyFullFraction: mode.full})
		reqs := make([]*pb.ReportFillRequest, *reports)
		for i := range reqs {
			k := key(run, i)
			g := n.grant(k)
			res := b.upload(g, k, data)
			reqs[i] = &pb.ReportFillRequest{Key: k, Target: g.Target, Token: g.Token, Size: res.Size, MediaType: g.MediaType,
				Sha256: res.SHA256, Sha1: res.SHA1, ObjectName: g.ObjectName, Crc32C: res.CRC32C, Generation: res.Generation}
		}
		var next atomic.Int64 // each report once
		rep := loadstat.Run(*concurrency, time.Hour, int64(len(reqs)), func(w, i int) (int64, error) {
			_, err := n.place.ReportFill(b.ctx, reqs[next.Add(1)-1])
			return 0, err
		})
		next.Store(0)
		miss := loadstat.Run(*concurrency, time.Hour, int64(len(reqs)), func(w, i int) (int64, error) {
			_, err := n.place.Place(b.ctx, &pb.PlaceRequest{Key: key(run+10, int(next.Add(1))), Command: "filesdata",
				AcceptedTargets: []string{n.t.Name}, AgentRegion: "us", AgentId: "bench"})
			return 0, err
		})
		fmt.Printf("%-22s  %-50s  %-50s  %.2f\n", mode.name, rep, miss, rep.PerSecond()/miss.PerSecond())
		n.stop()
	}
	fmt.Println()
}

// detection measures, with the default probe settings, how long after a target's client-facing URL
// stops serving Place stops redirecting to it. The baseline is the documented bound.
func (b *bench) detection() {
	n := b.start("detect", controlplane.Options{Janitor: controlplane.JanitorConfig{SweepInterval: time.Hour, ReconcileInterval: time.Hour}})
	defer n.stop()
	cfg := controlplane.JanitorConfig{}
	cfg.ProbeInterval, cfg.ProbeFailures = 2*time.Second, 3
	bound := time.Duration(cfg.ProbeFailures)*cfg.ProbeInterval + cfg.ProbeInterval
	fmt.Printf("== dead store detection: default probing (every 2s, 3 failures, timeout 2s): documented bound %s\n", bound)
	k := key(20, 0)
	g := n.grant(k)
	res := b.upload(g, k, []byte(strings.Repeat("canary of the benchmark\n", 100)))
	_, err := n.place.ReportFill(b.ctx, &pb.ReportFillRequest{Key: k, Target: g.Target, Token: g.Token, Size: res.Size,
		MediaType: g.MediaType, Sha256: res.SHA256, Sha1: res.SHA1, ObjectName: g.ObjectName, Crc32C: res.CRC32C, Generation: res.Generation})
	check(err)
	redirects := func() bool {
		resp, err := n.place.Place(b.ctx, &pb.PlaceRequest{Key: k, Command: "filesdata", AcceptedTargets: []string{n.t.Name}, AgentRegion: "us"})
		check(err)
		return resp.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT
	}
	waitFor := func(want bool) time.Duration {
		start := time.Now()
		for redirects() != want {
			if time.Since(start) > time.Minute {
				check(fmt.Errorf("redirects=%v not reached within a minute", want))
			}
			time.Sleep(50 * time.Millisecond)
		}
		return time.Since(start)
	}
	waitFor(true)
	for _, f := range []struct {
		name   string
		inject func()
	}{
		{"HTTP 403 (bucket not public)", func() { b.front.Fail(http.StatusForbidden) }},
		{"HTTP 404 (CDN misconfigured)", func() { b.front.Fail(http.StatusNotFound) }},
		{"unreachable (no answer)", b.front.Unreachable},
	} {
		var took []string
		var worst time.Duration
		for range *trials {
			f.inject()
			d := waitFor(false)
			worst = max(worst, d)
			took = append(took, d.Round(100*time.Millisecond).String())
			b.front.Heal()
			waitFor(true)
		}
		fmt.Printf("%-30s  redirects stopped after %-20s  worst/bound %.2f\n", f.name, strings.Join(took, ", "), worst.Seconds()/bound.Seconds())
	}
	fmt.Println()
}

// reconciler times one reconcile of a bucket holding -reconcile-objects indexed objects; the
// baseline is a bare listing of the same prefix through the same storage client.
func (b *bench) reconciler() {
	n := b.start("reconcile", controlplane.Options{Janitor: controlplane.JanitorConfig{SweepInterval: time.Hour, ReconcileInterval: time.Hour}})
	defer n.stop()
	reg := targets.NewRegistry(n.cli, "")
	fmt.Printf("== reconciler: %d objects in the bucket and the index\n", *reconcileN)
	body := []byte("small object for the reconciler benchmark\n")
	var next atomic.Int64
	loadstat.Run(8, time.Hour, int64(*reconcileN), func(w, i int) (int64, error) {
		k := key(30, int(next.Add(1)))
		name := "hg/" + k
		u := b.store.Create(b.ctx, n.t.Store.Bucket, name, controlplane.MediaTypeCBOR, k)
		if _, err := u.Write(body); err != nil {
			return 0, err
		}
		res, err := u.Commit()
		if err != nil {
			return 0, err
		}
		return 0, reg.PutObject(b.ctx, &pb.StoredObject{Key: k, Target: n.t.Name, State: pb.ObjectState_OBJECT_STATE_READY,
			Size: res.Size, MediaType: controlplane.MediaTypeCBOR, Sha256: res.SHA256, Sha1: res.SHA1, Crc32C: res.CRC32C,
			Created: timestamppb.New(time.Now().Add(-time.Hour)), ObjectName: name, Bucket: n.t.Store.Bucket,
			TargetUid: n.t.Uid, Generation: res.Generation})
	})
	for n.cp.IndexedObjects() < *reconcileN {
		time.Sleep(50 * time.Millisecond)
	}
	start := time.Now()
	listed := 0
	check(b.store.List(b.ctx, n.t.Store.Bucket, "hg/", func(blob.Listed) bool { listed++; return true }))
	list := time.Since(start)
	start = time.Now()
	check(n.cp.Janitor().Reconcile(b.ctx))
	rec := time.Since(start)
	fmt.Printf("reconcile: %d objects in %s (%.0f objects/s); baseline bare listing of %d in %s (%.0f/s); ratio %.2f\n",
		*reconcileN, rec.Round(time.Millisecond), float64(*reconcileN)/rec.Seconds(), listed, list.Round(time.Millisecond),
		float64(listed)/list.Seconds(), list.Seconds()/rec.Seconds())
	if left := n.cp.IndexedObjects(); left != *reconcileN {
		check(fmt.Errorf("the reconciler removed %d intact objects", *reconcileN-left))
	}
	b.restarted(n, list)
}

// restarted starts a second control plane on n's etcd, whose records it has not confirmed yet:
// how long until its listing has confirmed the target (baseline: the bare listing), and what a
// Place that redirects to a record not checked yet costs (one Stat of the object) against one
// that redirects to a confirmed record, on the same control plane.
func (b *bench) restarted(n *node, list time.Duration) {
	o := controlplane.Options{EtcdEndpoints: []string{n.cp.EtcdEndpoint()}, Listen: "127.0.0.1:0", GCSEndpoint: b.gcs.Endpoint(),
		Log: b.quiet, Insecure: true, DataDir: n.dir + "-2",
		Janitor: controlplane.JanitorConfig{SweepInterval: time.Hour, ReconcileInterval: time.Hour}}
	defer os.RemoveAll(o.DataDir)
	start := time.Now()
	cp, err := devstack.StartControlPlane(b.ctx, o)
	check(err)
	defer cp.Shutdown(context.Background())
	conn, err := grpc.NewClient(cp.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	check(err)
	defer conn.Close()
	place := pb.NewPlacementServiceClient(conn)
	ask := func(k string) time.Duration {
		t0 := time.Now()
		resp, err := place.Place(b.ctx, &pb.PlaceRequest{Key: k, Command: "filesdata", AcceptedTargets: []string{n.t.Name}, AgentRegion: "us"})
		check(err)
		if resp.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
			check(fmt.Errorf("restarted replica: %s answered %v", k, resp))
		}
		return time.Since(t0)
	}
	// Records asked for while the listing runs are checked one by one.
	var unchecked []time.Duration
	for i := 1; i <= 200 && cp.UnverifiedTargets() > 0; i++ {
		unchecked = append(unchecked, ask(key(30, i)))
	}
	for cp.UnverifiedTargets() > 0 {
		time.Sleep(time.Millisecond)
	}
	confirmed := time.Since(start)
	var trusted []time.Duration
	for i := 201; i <= 400; i++ {
		trusted = append(trusted, ask(key(30, i)))
	}
	fmt.Printf("restarted replica: %d records confirmed %s after its start (baseline: the bare listing, %s; ratio %.2f)\n",
		*reconcileN, confirmed.Round(time.Millisecond), list.Round(time.Millisecond), confirmed.Seconds()/list.Seconds())
	fmt.Printf("  Place redirecting to a record checked on demand: %d asked before the listing ended, median %s; to a confirmed record: median %s\n",
		len(unchecked), median(unchecked), median(trusted))
}

func median(ds []time.Duration) string {
	if len(ds) == 0 {
		return "n/a"
	}
	slices.Sort(ds)
	return ds[len(ds)/2].Round(10 * time.Microsecond).String()
}

// changed measures how long after an object is changed behind Detour's back (its hold released,
// then overwritten with bytes of the same size, truncated, or deleted through the storage API)
// Place stops redirecting to it, with bucket notifications through the Pub/Sub emulator. The
// baselines are DESIGN.md's bound (10 s) and what found them before, the reconcile interval (10 m).
func (b *bench) changed() {
	addr, err := gcsemu.PubSub()
	check(err)
	n := b.start("changes", controlplane.Options{Janitor: controlplane.JanitorConfig{SweepInterval: time.Hour, ReconcileInterval: time.Hour},
		StoreEvents: controlplane.StoreEventsConfig{Endpoint: addr, Topic: "projects/bench/topics/changes", Subscription: "projects/bench/subscriptions/changes"}})
	defer n.stop()
	raw, err := storage.NewClient(b.ctx, option.WithEndpoint(b.gcs.Endpoint()), option.WithoutAuthentication())
	check(err)
	defer raw.Close()
	fmt.Printf("== objects changed behind Detour's back: %d of each kind, bucket notifications through Pub/Sub (pstest)\n", *changes)
	fmt.Printf("%-32s  %-10s  %-10s  %-10s  %-10s  %s\n", "change", "min", "median", "p90", "max", "max / 10 s bound")
	redirects := func(k string) bool {
		resp, err := n.place.Place(b.ctx, &pb.PlaceRequest{Key: k, Command: "filesdata", AcceptedTargets: []string{n.t.Name}, AgentRegion: "us"})
		check(err)
		return resp.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT
	}
	kinds := []struct {
		name   string
		change func([]byte) []byte
	}{
		{"overwrite, same size", func(d []byte) []byte { return append([]byte("X"), d[1:]...) }},
		{"truncate to half", func(d []byte) []byte { return d[:len(d)/2] }},
		{"delete", func([]byte) []byte { return nil }},
	}
	data := []byte(strings.Repeat("an object that will change\n", 1000))
	for run, kind := range kinds {
		var took []time.Duration
		for i := range *changes {
			k := key(40+run, i)
			g := n.grant(k)
			res := b.upload(g, k, data)
			_, err := n.place.ReportFill(b.ctx, &pb.ReportFillRequest{Key: k, Target: g.Target, Token: g.Token, Size: res.Size,
				MediaType: g.MediaType, Sha256: res.SHA256, Sha1: res.SHA1, ObjectName: g.ObjectName, Crc32C: res.CRC32C, Generation: res.Generation})
			check(err)
			for !redirects(k) {
				time.Sleep(time.Millisecond)
			}
			_, err = b.store.Hold(b.ctx, g.Bucket, g.ObjectName, res.Generation, false)
			check(err)
			obj := raw.Bucket(g.Bucket).Object(g.ObjectName)
			start := time.Now()
			if next := kind.change(data); next == nil {
				check(obj.Delete(b.ctx))
			} else {
				w := obj.NewWriter(b.ctx)
				w.Write(next)
				check(w.Close())
			}
			for redirects(k) {
				if time.Since(start) > time.Minute {
					check(fmt.Errorf("%s: still redirected a minute after the change", kind.name))
				}
				time.Sleep(time.Millisecond)
			}
			took = append(took, time.Since(start))
		}
		slices.Sort(took)
		q := func(f float64) string {
			return took[min(len(took)-1, int(f*float64(len(took))))].Round(time.Millisecond).String()
		}
		fmt.Printf("%-32s  %-10s  %-10s  %-10s  %-10s  %.3f\n", kind.name, q(0), q(0.5), q(0.9), q(1), took[len(took)-1].Seconds()/10)
	}
	fmt.Println()
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "integrityload:", err)
		os.Exit(1)
	}
}
