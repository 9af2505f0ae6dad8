// Command etcdgrowth measures how etcd's database grows under sustained fills with the control
// plane's compaction and without it. Two control planes, each on its own embedded etcd, take the
// same fixed rate of fills (Place → upload → ReportFill) at the same time; one compacts every
// --compact-interval, the other never (the baseline: Detour before compaction). Every few seconds
// it prints both databases' file size, bytes in use and revision.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/controlplane"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/gcsemu"
)

var (
	duration    = flag.Duration("duration", time.Minute, "how long the fills run")
	fillRate    = flag.Float64("rate", 100, "fills per second per control plane")
	concurrency = flag.Int("concurrency", 4, "fills in flight per control plane")
	compactions = flag.Duration("compact-interval", 10*time.Second, "the compacting control plane's --compact-interval (the default is 5m; shorter here so that a minute shows several)")
	sample      = flag.Duration("sample", 5*time.Second, "how often sizes are printed")
)

type node struct {
	name  string
	cp    *devstack.ControlPlane
	place pb.PlacementServiceClient
	cli   *clientv3.Client
	dir   string
	fills atomic.Int64
	fails atomic.Int64
}

func main() {
	flag.Parse()
	ctx := context.Background()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	gcs, err := gcsemu.Start(0)
	check(err)
	defer gcs.Stop()
	front, err := gcs.StartFront()
	check(err)
	defer front.Close()
	store, err := blob.NewStore(ctx, blob.Options{Endpoint: gcs.Endpoint()})
	check(err)
	defer store.Close()
	host, _ := os.Hostname()
	fmt.Printf("etcdgrowth: host %s, %d CPUs, %s; %.0f fills/s for %s on each control plane, concurrency %d\n\n",
		host, runtime.NumCPU(), time.Now().UTC().Format("2006-01-02 15:04"), *fillRate, *duration, *concurrency)

	start := func(name string, interval time.Duration) *node {
		dir, err := os.MkdirTemp("", "etcdgrowth")
		check(err)
		// Plaintext gRPC: this is about etcd, not transport. No sweep or probe churn beyond the defaults.
		cp, err := devstack.StartControlPlane(ctx, controlplane.Options{Listen: "127.0.0.1:0", DataDir: dir, GCSEndpoint: gcs.Endpoint(),
			Log: quiet, Insecure: true, ClaimRate: -1, Etcd: controlplane.EtcdMaintenance{CompactInterval: interval}})
		check(err)
		conn, err := grpc.NewClient(cp.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		check(err)
		n := &node{name: name, cp: cp, place: pb.NewPlacementServiceClient(conn), dir: dir}
		n.cli, err = clientv3.New(cp.EmbeddedEtcd().ClientConfig())
		check(err)
		admin := pb.NewAdminServiceClient(conn)
		bucket := "bucket-" + name
		gcs.CreateBucket(bucket)
		public := front.PublicURL(bucket)
		_, err = admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: &pb.Target{Name: name, Protocol: "http",
			Uris: []string{public}, Region: "us", Weight: 1, Store: &pb.GcsStore{Bucket: bucket, Prefix: "hg/"},
			UrlForm: &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: public}}}})
		check(err)
		_, err = admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: &pb.Policy{MinOccurrences: 1}})
		check(err)
		return n
	}
	nodes := []*node{start("compacting", *compactions), start("never", -1)}
	defer func() {
		for _, n := range nodes {
			n.cli.Close()
			_ = n.cp.Shutdown(context.Background())
			os.RemoveAll(n.dir)
		}
	}()
	// The targets must pass their first probe before fills are granted.
	for _, n := range nodes {
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			resp, err := n.place.Place(ctx, &pb.PlaceRequest{Key: key(n.name, -1), Command: "filesdata",
				AcceptedTargets: []string{n.name}, AgentRegion: "us", AgentId: "bench"})
			check(err)
			if resp.Fill != nil {
				break
			}
			if time.Now().After(deadline) {
				check(fmt.Errorf("%s: no fill granted", n.name))
			}
		}
	}

	data := make([]byte, 4<<10)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, n := range nodes {
		lim := rate.NewLimiter(rate.Limit(*fillRate), 1)
		var next atomic.Int64
		for range *concurrency {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					_ = lim.Wait(ctx)
					if err := n.fill(ctx, store, key(n.name, int(next.Add(1))), data); err != nil {
						n.fails.Add(1)
					} else {
						n.fills.Add(1)
					}
				}
			}()
		}
	}
	fmt.Printf("%6s  %-44s  %-44s\n", "time", "compacting every "+compactions.String()+": db / in use / rev", "never compacted: db / in use / rev")
	t0 := time.Now()
	for time.Since(t0) < *duration {
		time.Sleep(*sample)
		line := fmt.Sprintf("%5.0fs", time.Since(t0).Seconds())
		for _, n := range nodes {
			st, err := n.cli.Status(ctx, n.cli.Endpoints()[0])
			check(err)
			line += fmt.Sprintf("  %-44s", fmt.Sprintf("%6.1f MiB / %6.1f MiB / %7d", mib(st.DbSize), mib(st.DbSizeInUse), st.Header.Revision))
		}
		fmt.Println(line)
	}
	close(stop)
	wg.Wait()
	elapsed := time.Since(t0).Seconds()
	var sizes [2]int64
	for i, n := range nodes {
		st, err := n.cli.Status(ctx, n.cli.Endpoints()[0])
		check(err)
		sizes[i] = st.DbSize
		fmt.Printf("%s: %d fills (%.0f/s), %d failed; db %.1f MiB, in use %.1f MiB\n", n.name, n.fills.Load(),
			float64(n.fills.Load())/elapsed, n.fails.Load(), mib(st.DbSize), mib(st.DbSizeInUse))
	}
	fmt.Printf("db size compacting / never: %.2f; fill rate compacting / never: %.2f\n", float64(sizes[0])/float64(sizes[1]),
		float64(nodes[0].fills.Load())/float64(max(1, nodes[1].fills.Load())))
}

func (n *node) fill(ctx context.Context, store *blob.Store, k string, data []byte) error {
	resp, err := n.place.Place(ctx, &pb.PlaceRequest{Key: k, Command: "filesdata", AcceptedTargets: []string{n.name},
		AgentRegion: "us", AgentId: "bench"})
	if err != nil {
		return err
	}
	g := resp.Fill
	if g == nil {
		return fmt.Errorf("no fill granted: %s", resp.Reason)
	}
	u := store.Create(ctx, g.Bucket, g.ObjectName, g.MediaType, k)
	if _, err := u.Write(data); err != nil {
		u.Abort()
		return err
	}
	res, err := u.Commit()
	if err != nil {
		return err
	}
	_, err = n.place.ReportFill(ctx, &pb.ReportFillRequest{Key: k, Target: g.Target, Token: g.Token, Size: res.Size,
		MediaType: g.MediaType, Sha256: res.SHA256, Sha1: res.SHA1, ObjectName: g.ObjectName, Crc32C: res.CRC32C, Generation: res.Generation})
	return err
}

func key(name string, i int) string {
	h := 0
	for _, c := range name {
		h = h*31 + int(c)
	}
	return fmt.Sprintf("%032x%032x", uint32(h), uint64(i+2))
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "etcdgrowth:", err)
		os.Exit(1)
	}
}
