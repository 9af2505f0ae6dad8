// Command regionload measures cross-region copies made by the store, against a real control plane
// on an embedded etcd with two regions (us-gcs, eu-gcs in one fake-gcs-server):
//
//   - the time to copy an object server-side (claim, copy, verify, READY record), against the time
//     to store the same bytes through a fill (upload through the storage client, ReportFill and its
//     verification) measured in the same run;
//   - the share of an eu agent's redirects that are in-region, over one Zipf sequence of Place
//     calls for keys filled in us, with cross-region copies off (baseline) and then on.
package main

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/controlplane"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/gcsemu"
)

func main() {
	nKeys := flag.Int("keys", 200, "objects filled in us")
	size := flag.Int("size", 1<<20, "bytes per object")
	requests := flag.Int("requests", 20000, "Place calls from the eu agent per run")
	conc := flag.Int("concurrency", 8, "concurrent Place calls")
	zipf := flag.Float64("zipf", 1.1, "Zipf exponent of the key popularity")
	threshold := flag.Uint("threshold", 10, "policy cross_region_copy_threshold")
	rate := flag.Float64("copy-rate", 50, "copies the janitor starts per second")
	flag.Parse()
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "regionload")
	check(err)
	defer os.RemoveAll(dir)
	gcs, err := gcsemu.Start(0)
	check(err)
	defer gcs.Stop()
	cp, err := devstack.StartControlPlane(ctx, controlplane.Options{Listen: "127.0.0.1:0", DataDir: dir, GCSEndpoint: gcs.Endpoint(), Insecure: true,
		Janitor: controlplane.JanitorConfig{ProbeInterval: time.Second, CopyInterval: 200 * time.Millisecond, CopyRate: *rate},
		Log:     slog.New(slog.NewTextHandler(io.Discard, nil))})
	check(err)
	defer cp.Shutdown(ctx)
	store, err := blob.NewStore(ctx, blob.Options{Endpoint: gcs.Endpoint()})
	check(err)
	defer store.Close()
	conn, err := grpc.NewClient(cp.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	check(err)
	admin, place := pb.NewAdminServiceClient(conn), pb.NewPlacementServiceClient(conn)

	both := []string{"us-gcs", "eu-gcs"}
	for i, name := range both {
		bucket := "bucket-" + name
		gcs.CreateBucket(bucket)
		_, err := admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: &pb.Target{Name: name, Protocol: "http",
			Uris: []string{gcs.PublicURL(bucket)}, Region: []string{"us", "eu"}[i], Weight: 1, Store: &pb.GcsStore{Bucket: bucket, Prefix: "p/"},
			UrlForm: &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: gcs.PublicURL(bucket)}}}})
		check(err)
	}
	for _, name := range both {
		for {
			t, err := admin.GetTarget(ctx, &pb.GetTargetRequest{Name: name})
			check(err)
			if t.Target.Healthy {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	setPolicy := func(edit func(*pb.Policy)) {
		cur, err := admin.GetPolicy(ctx, &pb.GetPolicyRequest{})
		check(err)
		edit(cur.Policy)
		_, err = admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: cur.Policy})
		check(err)
		_, err = admin.GetPolicy(ctx, &pb.GetPolicyRequest{}) // waits for the write
		check(err)
	}
	setPolicy(func(p *pb.Policy) { p.DisableCrossRegionCopies = true })

	// Fill every key in us the way an agent does; each fill is the baseline for a copy.
	keys := make([]string, *nKeys)
	var fills []time.Duration
	data := make([]byte, *size)
	for i := range keys {
		keys[i] = fmt.Sprintf("%064x", i+1)
		resp, err := place.Place(ctx, &pb.PlaceRequest{Key: keys[i], Command: "manifestdata", AcceptedTargets: both, AgentRegion: "us", AgentId: "us"})
		check(err)
		if resp.Fill == nil {
			check(fmt.Errorf("no fill granted for key %d: %s", i, resp.Reason))
		}
		g := resp.Fill
		_, _ = rand.Read(data)
		start := time.Now()
		u := store.Create(ctx, g.Bucket, g.ObjectName, g.MediaType, keys[i])
		_, err = u.Write(data)
		check(err)
		res, err := u.Commit()
		check(err)
		_, err = place.ReportFill(ctx, &pb.ReportFillRequest{Key: keys[i], Target: g.Target, Token: g.Token, Size: res.Size,
			MediaType: g.MediaType, Sha256: res.SHA256, Sha1: res.SHA1, ObjectName: g.ObjectName, Crc32C: res.CRC32C, Generation: res.Generation})
		check(err)
		fills = append(fills, time.Since(start))
	}

	// One Zipf sequence of eu Place calls, replayed for each run.
	rng := mrand.New(mrand.NewPCG(1, 2))
	z := mrand.NewZipf(rng, *zipf, 1, uint64(*nKeys-1))
	seq := make([]int, *requests)
	for i := range seq {
		seq[i] = int(z.Uint64())
	}
	host, _ := os.Hostname()
	fmt.Printf("regionload: %d keys of %d bytes filled in us, %d Place calls from eu (zipf %.2f, concurrency %d), threshold %d, copy rate %.0f/s, host %s, %d CPUs, %s\n",
		*nKeys, *size, *requests, *zipf, *conc, *threshold, *rate, host, runtime.NumCPU(), runtime.Version())

	off := run(ctx, place, keys, seq, *conc, *threshold)
	setPolicy(func(p *pb.Policy) {
		p.DisableCrossRegionCopies = false
		p.CrossRegionCopyThreshold = uint32(*threshold)
		p.CrossRegionCopyWindow = durationpb.New(10 * time.Minute)
	})
	on := run(ctx, place, keys, seq, *conc, *threshold)

	copyMean, copies := copyDuration(cp)
	fillMean := mean(fills)
	fmt.Printf("\ntime to store one %d-byte object in a region (mean):\n", *size)
	fmt.Printf("  fill (upload through the storage client + ReportFill)   %8s  (%d fills)\n", fillMean.Round(time.Microsecond), len(fills))
	fmt.Printf("  server-side copy (claim, copy, verify, READY record)    %8s  (%d copies)   ratio copy/fill %.2f\n",
		copyMean.Round(time.Microsecond), copies, copyMean.Seconds()/fillMean.Seconds())
	if len(on.reaction) > 0 {
		fmt.Printf("  from the redirect that crossed the threshold to the first in-region one: p50 %s, max %s (%d keys)\n",
			pct(on.reaction, 50).Round(time.Millisecond), pct(on.reaction, 100).Round(time.Millisecond), len(on.reaction))
	}
	fmt.Printf("\nshare of eu redirects that are in-region, same sequence:\n")
	fmt.Printf("  %-28s  all %5.1f%%  by tenth of the run: %s\n", "copies off (baseline)", 100*off.share(), off.tenths())
	fmt.Printf("  %-28s  all %5.1f%%  by tenth of the run: %s\n", "copies on", 100*on.share(), on.tenths())
	fmt.Printf("  redirects that left the region: %d with copies off, %d with copies on (ratio %.3f)\n",
		off.cross(), on.cross(), float64(on.cross())/float64(max(1, off.cross())))
}

type outcome struct {
	in       []bool // per request in sequence order: redirected in-region
	reaction []time.Duration
}

func (o outcome) share() float64 {
	n := 0
	for _, b := range o.in {
		if b {
			n++
		}
	}
	return float64(n) / float64(len(o.in))
}

func (o outcome) cross() int {
	n := 0
	for _, b := range o.in {
		if !b {
			n++
		}
	}
	return n
}

func (o outcome) tenths() string {
	s := ""
	for t := range 10 {
		part := outcome{in: o.in[t*len(o.in)/10 : (t+1)*len(o.in)/10]}
		s += fmt.Sprintf("%3.0f ", 100*part.share())
	}
	return s
}

// run replays seq from eu and records, per request, whether it was redirected in-region, and per
// key the time from its threshold-crossing redirect to its first in-region one.
func run(ctx context.Context, place pb.PlacementServiceClient, keys []string, seq []int, conc int, threshold uint) outcome {
	o := outcome{in: make([]bool, len(seq))}
	var mu sync.Mutex
	crossed := map[int]time.Time{}
	crossCount := map[int]uint{}
	done := map[int]bool{}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(seq) {
					return
				}
				k := seq[i]
				resp, err := place.Place(ctx, &pb.PlaceRequest{Key: keys[k], Command: "manifestdata",
					AcceptedTargets: []string{"eu-gcs", "us-gcs"}, AgentRegion: "eu", AgentId: "eu"})
				check(err)
				if resp.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
					check(fmt.Errorf("request %d: %s, want a redirect", i, resp.Reason))
				}
				now := time.Now()
				mu.Lock()
				if resp.Target == "eu-gcs" {
					o.in[i] = true
					if t, ok := crossed[k]; ok && !done[k] {
						done[k] = true
						o.reaction = append(o.reaction, now.Sub(t))
					}
				} else {
					crossCount[k]++
					if crossCount[k] == threshold+1 {
						crossed[k] = now
					}
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return o
}

// copyDuration reads the control plane's histogram of cross-region copies.
func copyDuration(cp *devstack.ControlPlane) (time.Duration, uint64) {
	families, err := cp.Metrics().Registry.Gather()
	check(err)
	for _, f := range families {
		if f.GetName() != "detour_store_copy_duration_seconds" {
			continue
		}
		for _, m := range f.GetMetric() {
			if h := m.GetHistogram(); h.GetSampleCount() > 0 {
				return time.Duration(h.GetSampleSum() / float64(h.GetSampleCount()) * float64(time.Second)), h.GetSampleCount()
			}
		}
	}
	return 0, 0
}

func mean(ds []time.Duration) time.Duration {
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	return sum / time.Duration(max(1, len(ds)))
}

func pct(ds []time.Duration, p int) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, len(s)*p/100)]
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "regionload:", err)
		os.Exit(1)
	}
}
