// Command placeload measures Place over gRPC on loopback against a real control plane on an
// embedded etcd, at several concurrencies, and in the same run an empty unary RPC (the health
// check) on the same server, so the result is a ratio that survives a noisy machine.
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
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/bench/loadstat"
	"github.com/detourhq/detour/internal/controlplane"
	"github.com/detourhq/detour/internal/gcsemu"
	"github.com/detourhq/detour/internal/pki"
	"github.com/detourhq/detour/internal/targets"
)

func main() {
	dur := flag.Duration("duration", 5*time.Second, "time per measurement")
	levels := flag.String("concurrency", "1,16,64", "comma-separated concurrency levels")
	nTargets := flag.Int("targets", 10, "registered targets")
	nObjects := flag.Int("objects", 10000, "READY objects in the index")
	misses := flag.Bool("misses", false, "every Place is a miss for a new key (records a fill claim in etcd)")
	transports := flag.String("transports", "insecure", "comma-separated: insecure (plaintext) and/or mtls; each gets its own control plane in this run")
	flag.Parse()
	ctx := context.Background()
	gcs, err := gcsemu.Start(0)
	check(err)
	defer gcs.Stop()
	var rigs []*rig
	for _, tr := range strings.Split(*transports, ",") {
		if tr != "insecure" && tr != "mtls" {
			check(fmt.Errorf("-transports: %q is neither insecure nor mtls", tr))
		}
		r := newRig(ctx, gcs, tr, *nTargets, *nObjects)
		defer r.close()
		rigs = append(rigs, r)
	}
	host, _ := os.Hostname()
	fmt.Printf("placeload: %d targets, %d READY objects, %s per measurement, host %s, GOMAXPROCS from %d CPUs\n",
		*nTargets, *nObjects, *dur, host, runtime.NumCPU())
	fmt.Printf("%-8s  %-5s  %-50s  %-50s  %s\n", "transport", "conc", "Place (redirect answers)", "empty unary (health check)", "ratio")
	for _, l := range strings.Split(*levels, ",") {
		c, err := strconv.Atoi(l)
		check(err)
		// Transports alternate within each level so a noisy stretch of the machine hits both.
		for _, r := range rigs {
			pr := loadstat.Run(c, *dur, 0, func(w, i int) (int64, error) {
				key := r.keys[(w*7919+i)%len(r.keys)]
				if *misses {
					key = fmt.Sprintf("%032x%032x", c*1000+w+1, i+1)
				}
				_, err := r.place.Place(ctx, &pb.PlaceRequest{Key: key, Command: "manifestdata",
					AcceptedTargets: r.names, Hashes: []string{"sha256"}, AgentRegion: "us", AgentId: r.agentID})
				return 0, err
			})
			er := loadstat.Run(c, *dur, 0, func(w, i int) (int64, error) {
				_, err := r.health.Check(ctx, &healthpb.HealthCheckRequest{})
				return 0, err
			})
			fmt.Printf("%-8s  %-5d  %-50s  %-50s  %.2f\n", r.transport, c, pr, er, pr.PerSecond()/er.PerSecond())
		}
	}
}

// rig is one control plane on its own embedded etcd, served over one transport, with targets and
// READY objects registered, and a client connection to it.
type rig struct {
	transport   string
	agentID     string
	names, keys []string
	place       pb.PlacementServiceClient
	health      healthpb.HealthClient
	close       func()
}

func newRig(ctx context.Context, gcs *gcsemu.Server, transport string, nTargets, nObjects int) *rig {
	dir, err := os.MkdirTemp("", "placeload")
	check(err)
	opts := controlplane.Options{Listen: "127.0.0.1:0", DataDir: dir, GCSEndpoint: gcs.Endpoint(), Insecure: transport == "insecure",
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	dial := grpc.WithTransportCredentials(insecure.NewCredentials())
	var adminDial grpc.DialOption
	r := &rig{transport: transport, agentID: "bench"}
	var closers []func()
	if transport == "mtls" {
		dev, _, err := pki.EnsureDev(filepath.Join(dir, "pki"))
		check(err)
		opts.TLS = pki.Files{Cert: dev.ControlPlane.Cert, Key: dev.ControlPlane.Key, CA: dev.CA.CA}
		agentCreds, err := pki.ClientCredentials(dev.Agent)
		check(err)
		opCreds, err := pki.ClientCredentials(dev.Operator)
		check(err)
		closers = append(closers, agentCreds.Close, opCreds.Close)
		dial, adminDial = grpc.WithTransportCredentials(agentCreds), grpc.WithTransportCredentials(opCreds)
		r.agentID = "dev"
	}
	if adminDial == nil {
		adminDial = dial
	}
	cp, err := controlplane.Start(ctx, opts)
	check(err)
	conn, err := grpc.NewClient(cp.Addr(), dial)
	check(err)
	adminConn, err := grpc.NewClient(cp.Addr(), adminDial)
	check(err)
	r.close = func() {
		conn.Close()
		adminConn.Close()
		cp.Shutdown(ctx)
		for _, c := range closers {
			c()
		}
		os.RemoveAll(dir)
	}
	admin := pb.NewAdminServiceClient(adminConn)
	r.place, r.health = pb.NewPlacementServiceClient(conn), healthpb.NewHealthClient(conn)
	created := map[string]*pb.Target{}
	for i := range nTargets {
		name := fmt.Sprintf("t%d", i)
		r.names = append(r.names, name)
		bucket := transport + "-bucket-" + name
		gcs.CreateBucket(bucket)
		resp, err := admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: &pb.Target{Name: name, Protocol: "http",
			Uris: []string{gcs.PublicURL(bucket)}, Region: []string{"us", "eu"}[i%2], Weight: 1,
			Store:   &pb.GcsStore{Bucket: bucket, Prefix: "p/"},
			UrlForm: &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: gcs.PublicURL(bucket)}}}})
		check(err)
		created[name] = resp.Target
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{cp.EtcdEndpoint()}})
	check(err)
	defer cli.Close()
	reg := targets.NewRegistry(cli, "")
	r.keys = make([]string, nObjects)
	for i := range r.keys {
		r.keys[i] = fmt.Sprintf("%064x", i+1)
		// Records as verified fills write them (the benchmark measures Place, not fills).
		t := created[r.names[i%len(r.names)]]
		check(reg.PutObject(ctx, &pb.StoredObject{Key: r.keys[i], Target: t.Name, State: pb.ObjectState_OBJECT_STATE_READY,
			Size: 1 << 20, MediaType: controlplane.MediaTypeCBOR, Sha256: make([]byte, 32), Sha1: make([]byte, 20),
			Created: timestamppb.Now(), ObjectName: "p/" + r.keys[i], Bucket: t.Store.Bucket, TargetUid: t.Uid, Generation: 1}))
	}
	for {
		resp, err := r.place.Place(ctx, &pb.PlaceRequest{Key: r.keys[len(r.keys)-1], Command: "manifestdata", AcceptedTargets: r.names, AgentRegion: "us", AgentId: r.agentID})
		check(err)
		if resp.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
			return r
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "placeload:", err)
		os.Exit(1)
	}
}
