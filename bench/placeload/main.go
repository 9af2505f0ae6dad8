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
	"github.com/detourhq/detour/internal/targets"
)

func main() {
	dur := flag.Duration("duration", 5*time.Second, "time per measurement")
	levels := flag.String("concurrency", "1,16,64", "comma-separated concurrency levels")
	nTargets := flag.Int("targets", 10, "registered targets")
	nObjects := flag.Int("objects", 10000, "READY objects in the index")
	misses := flag.Bool("misses", false, "every Place is a miss for a new key (records a fill claim in etcd)")
	flag.Parse()
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "placeload")
	check(err)
	defer os.RemoveAll(dir)
	gcs, err := gcsemu.Start(0)
	check(err)
	defer gcs.Stop()
	cp, err := controlplane.Start(ctx, controlplane.Options{Listen: "127.0.0.1:0", DataDir: dir, GCSEndpoint: gcs.Endpoint(), Insecure: true,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	check(err)
	defer cp.Shutdown(ctx)

	conn, err := grpc.NewClient(cp.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	check(err)
	admin, place, health := pb.NewAdminServiceClient(conn), pb.NewPlacementServiceClient(conn), healthpb.NewHealthClient(conn)
	var names []string
	created := map[string]*pb.Target{}
	for i := range *nTargets {
		name := fmt.Sprintf("t%d", i)
		names = append(names, name)
		bucket := "bucket-" + name
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
	reg := targets.NewRegistry(cli, "")
	keys := make([]string, *nObjects)
	for i := range keys {
		keys[i] = fmt.Sprintf("%064x", i+1)
		// Records as verified fills write them (the benchmark measures Place, not fills).
		t := created[names[i%len(names)]]
		check(reg.PutObject(ctx, &pb.StoredObject{Key: keys[i], Target: t.Name, State: pb.ObjectState_OBJECT_STATE_READY,
			Size: 1 << 20, MediaType: controlplane.MediaTypeCBOR, Sha256: make([]byte, 32), Sha1: make([]byte, 20),
			Created: timestamppb.Now(), ObjectName: "p/" + keys[i], Bucket: t.Store.Bucket, TargetUid: t.Uid, Generation: 1}))
	}
	for {
		resp, err := place.Place(ctx, &pb.PlaceRequest{Key: keys[len(keys)-1], Command: "manifestdata", AcceptedTargets: names, AgentRegion: "us"})
		check(err)
		if resp.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	host, _ := os.Hostname()
	fmt.Printf("placeload: %d targets, %d READY objects, %s per measurement, host %s, GOMAXPROCS from %d CPUs\n",
		*nTargets, *nObjects, *dur, host, runtime.NumCPU())
	fmt.Printf("%-5s  %-50s  %-50s  %s\n", "conc", "Place (redirect answers)", "empty unary (health check)", "ratio")
	for _, l := range strings.Split(*levels, ",") {
		c, err := strconv.Atoi(l)
		check(err)
		pr := loadstat.Run(c, *dur, 0, func(w, i int) (int64, error) {
			key := keys[(w*7919+i)%len(keys)]
			if *misses {
				key = fmt.Sprintf("%032x%032x", c*1000+w+1, i+1)
			}
			_, err := place.Place(ctx, &pb.PlaceRequest{Key: key, Command: "manifestdata",
				AcceptedTargets: names, Hashes: []string{"sha256"}, AgentRegion: "us", AgentId: "bench"})
			return 0, err
		})
		er := loadstat.Run(c, *dur, 0, func(w, i int) (int64, error) {
			_, err := health.Check(ctx, &healthpb.HealthCheckRequest{})
			return 0, err
		})
		fmt.Printf("%-5d  %-50s  %-50s  %.2f\n", c, pr, er, pr.PerSecond()/er.PerSecond())
	}
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "placeload:", err)
		os.Exit(1)
	}
}
