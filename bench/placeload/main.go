// Command placeload measures Place over gRPC on loopback against a real control plane on an
// embedded etcd, at several concurrencies, and in the same run an empty unary RPC (the health
// check) on the same server, so the result is a ratio that survives a noisy machine.
//
// With -misses every Place is a miss for a new key, measured three ways in the same run, each on
// its own control plane and etcd: with min_occurrences 1 and a transaction per fill claim (the
// baseline), with min_occurrences 1 and grouped claims (group commit), and with min_occurrences 2,
// where a first miss is answered without any etcd write.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/bench/loadstat"
	"github.com/detourhq/detour/internal/controlplane"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/gcsemu"
	"github.com/detourhq/detour/internal/pki"
	"github.com/detourhq/detour/internal/targets"
)

func main() {
	dur := flag.Duration("duration", 5*time.Second, "time per measurement")
	levels := flag.String("concurrency", "1,16,64", "comma-separated concurrency levels")
	nTargets := flag.Int("targets", 10, "registered targets")
	nObjects := flag.Int("objects", 10000, "READY objects in the index")
	misses := flag.Bool("misses", false, "every Place is a miss for a new key: compare a claim transaction each, grouped claims, and min_occurrences 2")
	groupCommit := flag.Bool("group-commit", true, "with -misses: also measure grouped claims (false: only the baseline, a transaction per claim)")
	inFlight := flag.Int("claims-in-flight", 0, "with -misses: the grouped control plane's --claims-in-flight (0: its default)")
	transports := flag.String("transports", "insecure", "without -misses, comma-separated: insecure (plaintext) and/or mtls; each gets its own control plane in this run")
	flag.Parse()
	ctx := context.Background()
	gcs, err := gcsemu.Start(0)
	check(err)
	defer gcs.Stop()

	host, _ := os.Hostname()
	fmt.Printf("placeload: %d targets, %d READY objects, %s per measurement, host %s, GOMAXPROCS from %d CPUs\n",
		*nTargets, *nObjects, *dur, host, runtime.NumCPU())
	if !*misses {
		var benches []*bench
		for _, tr := range strings.Split(*transports, ",") {
			if tr != "insecure" && tr != "mtls" {
				check(fmt.Errorf("-transports: %q is neither insecure nor mtls", tr))
			}
			b := start(ctx, gcs, *nTargets, *nObjects, controlplane.Options{}, tr)
			defer b.close(ctx)
			benches = append(benches, b)
		}
		fmt.Printf("%-9s  %-5s  %-50s  %-50s  %s\n", "transport", "conc", "Place (redirect answers)", "empty unary (health check)", "ratio")
		for _, c := range concurrencies(*levels) {
			// Transports alternate within each level so that a noisy stretch of the machine hits both.
			for _, b := range benches {
				pr := loadstat.Run(c, *dur, 0, func(w, i int) (int64, error) {
					_, err := b.place.Place(ctx, b.request(b.keys[(w*7919+i)%len(b.keys)]))
					return 0, err
				})
				er := b.empty(c, *dur)
				fmt.Printf("%-9s  %-5d  %-50s  %-50s  %.2f\n", b.transport, c, pr, er, pr.PerSecond()/er.PerSecond())
			}
		}
		return
	}

	// Claims are not rate limited here: the benchmark is one agent taking every claim.
	single := start(ctx, gcs, *nTargets, *nObjects, controlplane.Options{ClaimsInFlight: -1, ClaimRate: -1}, "insecure")
	defer single.close(ctx)
	single.setMinOccurrences(ctx, 1)
	var grouped *bench
	if *groupCommit {
		grouped = start(ctx, gcs, *nTargets, *nObjects, controlplane.Options{ClaimRate: -1, ClaimsInFlight: *inFlight}, "insecure")
		defer grouped.close(ctx)
	}
	var fresh atomic.Int64
	missRun := func(b *bench, c int) (loadstat.Result, float64) {
		var fills atomic.Int64
		r := loadstat.Run(c, *dur, 0, func(w, i int) (int64, error) {
			resp, err := b.place.Place(ctx, b.request(fmt.Sprintf("%064x", fresh.Add(1))))
			if err == nil && resp.Fill != nil {
				fills.Add(1)
			}
			return 0, err
		})
		return r, float64(fills.Load()) / float64(max(r.Ops, 1))
	}
	fmt.Println("every Place a miss for a new key; claims/s: answers that carried a fill grant (an etcd claim) per second")
	fmt.Printf("%-5s  %-66s  %-66s  %-6s  %s\n", "conc", "min_occurrences 1, a transaction per claim (baseline)", "min_occurrences 1, grouped claims", "ratio", "empty RPC/s")
	for _, c := range concurrencies(*levels) {
		base, bf := missRun(single, c)
		er := single.empty(c, *dur)
		row := fmt.Sprintf("%-5d  %-66s", c, fmt.Sprintf("%s claims/s %.0f", base, bf*base.PerSecond()))
		if grouped != nil {
			grouped.setMinOccurrences(ctx, 1)
			g, gf := missRun(grouped, c)
			row += fmt.Sprintf("  %-66s  %-6.2f", fmt.Sprintf("%s claims/s %.0f", g, gf*g.PerSecond()), g.PerSecond()/base.PerSecond())
		}
		fmt.Printf("%s  %.0f\n", row, er.PerSecond())
	}
	if grouped == nil {
		return
	}
	fmt.Println("\nmin_occurrences 2 (the default): every first miss is answered without an etcd write")
	fmt.Printf("%-5s  %-66s  %-50s  %s\n", "conc", "Place, first misses", "empty unary (health check)", "ratio")
	grouped.setMinOccurrences(ctx, 2)
	for _, c := range concurrencies(*levels) {
		m, mf := missRun(grouped, c)
		er := grouped.empty(c, *dur)
		fmt.Printf("%-5d  %-66s  %-50s  %.2f\n", c, fmt.Sprintf("%s claims/s %.0f", m, mf*m.PerSecond()), er, m.PerSecond()/er.PerSecond())
	}
}

// bench is one control plane on its own embedded etcd, with targets and READY objects, served
// over one transport: insecure (plaintext) or mtls (the agent and operator certificates of a
// development PKI).
type bench struct {
	transport string
	agentID   string
	closers   []func()
	cp        *devstack.ControlPlane
	dir       string
	admin     pb.AdminServiceClient
	place     pb.PlacementServiceClient
	health    healthpb.HealthClient
	names     []string
	keys      []string
}

func start(ctx context.Context, gcs *gcsemu.Server, nTargets, nObjects int, o controlplane.Options, transport string) *bench {
	dir, err := os.MkdirTemp("", "placeload")
	check(err)
	o.Listen, o.DataDir, o.GCSEndpoint, o.Insecure = "127.0.0.1:0", dir, gcs.Endpoint(), transport == "insecure"
	o.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	b := &bench{transport: transport, agentID: "bench", dir: dir}
	agentDial := grpc.WithTransportCredentials(insecure.NewCredentials())
	adminDial := agentDial
	if transport == "mtls" {
		dev, _, err := pki.EnsureDev(filepath.Join(dir, "pki"))
		check(err)
		o.TLS = pki.Files{Cert: dev.ControlPlane.Cert, Key: dev.ControlPlane.Key, CA: dev.CA.CA}
		agentCreds, err := pki.ClientCredentials(dev.Agent)
		check(err)
		opCreds, err := pki.ClientCredentials(dev.Operator)
		check(err)
		b.closers = append(b.closers, agentCreds.Close, opCreds.Close)
		agentDial, adminDial = grpc.WithTransportCredentials(agentCreds), grpc.WithTransportCredentials(opCreds)
		b.agentID = "dev" // the development agent certificate's identity
	}
	cp, err := devstack.StartControlPlane(ctx, o)
	check(err)
	b.cp = cp
	conn, err := grpc.NewClient(cp.Addr(), agentDial)
	check(err)
	adminConn, err := grpc.NewClient(cp.Addr(), adminDial)
	check(err)
	b.closers = append(b.closers, func() { conn.Close() }, func() { adminConn.Close() })
	b.admin, b.place, b.health = pb.NewAdminServiceClient(adminConn), pb.NewPlacementServiceClient(conn), healthpb.NewHealthClient(conn)
	created := map[string]*pb.Target{}
	for i := range nTargets {
		name := fmt.Sprintf("t%d", i)
		b.names = append(b.names, name)
		bucket := transport + "-bucket-" + name
		gcs.CreateBucket(bucket)
		resp, err := b.admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: &pb.Target{Name: name, Protocol: "http",
			Uris: []string{gcs.PublicURL(bucket)}, Region: []string{"us", "eu"}[i%2], Weight: 1,
			Store:   &pb.GcsStore{Bucket: bucket, Prefix: "p/"},
			UrlForm: &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: gcs.PublicURL(bucket)}}}})
		check(err)
		created[name] = resp.Target
	}
	cli, err := clientv3.New(cp.EmbeddedEtcd().ClientConfig())
	check(err)
	defer cli.Close()
	reg := targets.NewRegistry(cli, "")
	b.keys = make([]string, nObjects)
	for i := range b.keys {
		b.keys[i] = fmt.Sprintf("%064x", i+1)
		// Records as verified fills write them (the benchmark measures Place, not fills).
		t := created[b.names[i%len(b.names)]]
		check(reg.PutObject(ctx, &pb.StoredObject{Key: b.keys[i], Target: t.Name, State: pb.ObjectState_OBJECT_STATE_READY,
			Size: 1 << 20, MediaType: controlplane.MediaTypeCBOR, Sha256: make([]byte, 32), Sha1: make([]byte, 20),
			Created: timestamppb.Now(), ObjectName: "p/" + b.keys[i], Bucket: t.Store.Bucket, TargetUid: t.Uid, Generation: 1}))
	}
	for {
		resp, err := b.place.Place(ctx, b.request(b.keys[len(b.keys)-1]))
		check(err)
		if resp.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
			return b
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (b *bench) request(key string) *pb.PlaceRequest {
	return &pb.PlaceRequest{Key: key, Command: "manifestdata", AcceptedTargets: b.names, Hashes: []string{"sha256"},
		AgentRegion: "us", AgentId: b.agentID}
}

func (b *bench) setMinOccurrences(ctx context.Context, n uint32) {
	cur, err := b.admin.GetPolicy(ctx, &pb.GetPolicyRequest{})
	check(err)
	cur.Policy.MinOccurrences = n
	_, err = b.admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: cur.Policy})
	check(err)
	_, err = b.admin.GetPolicy(ctx, &pb.GetPolicyRequest{}) // returns once the snapshot has it
	check(err)
}

func (b *bench) empty(c int, d time.Duration) loadstat.Result {
	return loadstat.Run(c, d, 0, func(w, i int) (int64, error) {
		_, err := b.health.Check(context.Background(), &healthpb.HealthCheckRequest{})
		return 0, err
	})
}

func (b *bench) close(ctx context.Context) {
	b.cp.Shutdown(ctx)
	for _, c := range b.closers {
		c()
	}
	os.RemoveAll(b.dir)
}

func concurrencies(levels string) []int {
	var out []int
	for _, l := range strings.Split(levels, ",") {
		c, err := strconv.Atoi(l)
		check(err)
		out = append(out, c)
	}
	return out
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "placeload:", err)
		os.Exit(1)
	}
}
