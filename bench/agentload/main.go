// Command agentload measures the agent against the demo origin served directly, in one run, on
// the whole in-process stack (control plane on embedded etcd, GCS emulator, origin, agent):
//
//   - redirect: answers per second when every key is READY (the agent answers with a location
//     and never touches the origin), against the origin serving the same requests inline;
//   - inline: bytes per second relayed by the agent for a client without redirect support,
//     against the origin directly;
//   - zipf: the fraction of origin bytes saved on a Zipf(1.1) workload over -keys keys and
//     -requests requests, starting from an empty store, and the objects it stored, once for each
//     policy min_occurrences in -zipf-min-occurrences (each on keys of its own).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/bench/loadstat"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/hgclient"
	"github.com/detourhq/detour/internal/wire"
)

func main() {
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the whole run here")
	phases := flag.String("phases", "redirect,inline,fill,zipf", "measurements to make, comma-separated")
	claimRate := flag.Float64("claim-rate", 0, "the control plane's fill claims per agent per second (0: its default, 100; negative: unbounded)")
	zipfOcc := flag.String("zipf-min-occurrences", "1,2", "policy min_occurrences of each Zipf run, comma-separated")
	flag.Parse()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		check(err)
		check(pprof.StartCPUProfile(f))
		defer pprof.StopCPUProfile()
	}
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "agentload")
	check(err)
	defer os.RemoveAll(dir)
	s, err := devstack.Start(ctx, devstack.Options{DataDir: dir, ObjectSize: *size, PlaceTimeout: time.Second, ClaimRate: *claimRate,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	check(err)
	defer s.Close(ctx)
	transport := &http.Transport{MaxIdleConnsPerHost: 256}
	httpc := &http.Client{Transport: transport}
	viaAgent := &hgclient.Client{Base: s.AgentURL, HTTP: httpc}
	direct := &hgclient.Client{Base: s.OriginURL, HTTP: httpc}
	hs, err := viaAgent.Capabilities(ctx)
	check(err)
	rr := &wire.RedirectRequest{Targets: hgclient.Accepted(hs.Redirect, "http", "https"), Hashes: []string{"sha256", "sha1"}}
	args := func(k, size int) map[string]any {
		return map[string]any{"nodes": []any{fmt.Sprintf("%020d", k)}, "tree": "", "size": uint64(size)}
	}
	host, _ := os.Hostname()
	fmt.Printf("agentload: host %s, %d CPUs, concurrency %d, %s per measurement\n\n", host, runtime.NumCPU(), *conc, *dur)

	do := map[string]bool{}
	for _, p := range strings.Split(*phases, ",") {
		do[p] = true
	}
	noFollow := &redirectOnly{c: viaAgent}
	if do["redirect"] {
		redirect(ctx, s, viaAgent, direct, noFollow, rr, args)
	}
	if do["inline"] {
		inline(ctx, viaAgent, direct, args)
	}
	if do["fill"] {
		fill(ctx, viaAgent, direct, rr, args)
	}
	if !do["zipf"] {
		return
	}
	for i, f := range strings.Split(*zipfOcc, ",") {
		n, err := strconv.ParseUint(f, 10, 32)
		check(err)
		zipf(ctx, s, noFollow, rr, args, uint32(n), 1_000_000*(i+1))
	}
}

var (
	dur      = flag.Duration("duration", 5*time.Second, "time per throughput measurement")
	conc     = flag.Int("concurrency", 16, "concurrent clients")
	size     = flag.Int("size", 256<<10, "response size of the redirect and inline runs")
	hot      = flag.Int("hot", 100, "READY keys in the redirect run")
	keys     = flag.Int("keys", 10000, "distinct keys in the Zipf run")
	requests = flag.Int("requests", 100000, "requests in the Zipf run")
	zipfSize = flag.Int("zipf-size", 16<<10, "response size in the Zipf run")
)

type argsFunc = func(k, size int) map[string]any

func redirect(ctx context.Context, s *devstack.Stack, viaAgent, direct *hgclient.Client, noFollow *redirectOnly, rr *wire.RedirectRequest, args argsFunc) {
	// Redirect: fill the hot keys, then measure answers per second.
	for k := range *hot {
		_, err := viaAgent.Command(ctx, "manifestdata", args(k, *size), rr)
		check(err)
	}
	waitReady(s, *hot)
	red := loadstat.Run(*conc, *dur, 0, func(w, i int) (int64, error) {
		return noFollow.command(ctx, args((w*31+i)%*hot, *size), rr)
	})
	org := loadstat.Run(*conc, *dur, 0, func(w, i int) (int64, error) {
		res, err := direct.Command(ctx, "manifestdata", args((w*31+i)%*hot, *size), nil)
		if err != nil {
			return 0, err
		}
		return int64(len(res.Objects)), nil
	})
	fmt.Printf("redirect answers through the agent  %s\n", red)
	fmt.Printf("same requests, origin direct inline %s  (%.0f MB/s)\n", org, org.MBps())
	fmt.Printf("ratio agent redirects / origin responses per second: %.2f\n\n", red.PerSecond()/org.PerSecond())
}

func inline(ctx context.Context, viaAgent, direct *hgclient.Client, args argsFunc) {

	// Inline: a client without redirect support, through the agent and directly.
	inl := loadstat.Run(*conc, *dur, 0, func(w, i int) (int64, error) {
		res, err := viaAgent.Command(ctx, "manifestdata", args((w*31+i)%*hot, *size), nil)
		if err != nil {
			return 0, err
		}
		return int64(len(res.Objects)), nil
	})
	org2 := loadstat.Run(*conc, *dur, 0, func(w, i int) (int64, error) {
		res, err := direct.Command(ctx, "manifestdata", args((w*31+i)%*hot, *size), nil)
		if err != nil {
			return 0, err
		}
		return int64(len(res.Objects)), nil
	})
	fmt.Printf("inline through the agent  %s  %.0f MB/s\n", inl, inl.MBps())
	fmt.Printf("inline from the origin    %s  %.0f MB/s\n", org2, org2.MBps())
	fmt.Printf("ratio agent / origin inline throughput: %.2f\n\n", inl.MBps()/org2.MBps())
}

func fill(ctx context.Context, viaAgent, direct *hgclient.Client, rr *wire.RedirectRequest, args argsFunc) {

	// Inline with a fill: every request a new key, so every one streams to the client and the store.
	var fresh atomic.Int64
	fresh.Store(10_000_000)
	fil := loadstat.Run(*conc, *dur, 0, func(w, i int) (int64, error) {
		res, err := viaAgent.Command(ctx, "manifestdata", args(int(fresh.Add(1)), *size), rr)
		if err != nil {
			return 0, err
		}
		return int64(len(res.Objects)), nil
	})
	org3 := loadstat.Run(*conc, *dur, 0, func(w, i int) (int64, error) {
		res, err := direct.Command(ctx, "manifestdata", args(int(fresh.Add(1)), *size), nil)
		if err != nil {
			return 0, err
		}
		return int64(len(res.Objects)), nil
	})
	fmt.Printf("inline+fill through the agent  %s  %.0f MB/s\n", fil, fil.MBps())
	fmt.Printf("new keys from the origin       %s  %.0f MB/s\n", org3, org3.MBps())
	fmt.Printf("ratio agent inline+fill / origin throughput: %.2f\n\n", fil.MBps()/org3.MBps())
}

// zipf runs the Zipf workload on keys from base under policy min_occurrences n.
func zipf(ctx context.Context, s *devstack.Stack, noFollow *redirectOnly, rr *wire.RedirectRequest, args argsFunc, n uint32, base int) {
	cur, err := s.Admin.GetPolicy(ctx, &pb.GetPolicyRequest{})
	check(err)
	cur.Policy.MinOccurrences = n
	_, err = s.Admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: cur.Policy})
	check(err)
	_, err = s.Admin.GetPolicy(ctx, &pb.GetPolicyRequest{}) // returns once the snapshot has it
	check(err)
	stored := countObjects(ctx, s)
	// Zipf: origin bytes with Detour against every request served by the origin.
	before := s.Origin.ObjectBytes()
	r := rand.New(rand.NewPCG(1, 2))
	z := rand.NewZipf(r, 1.1, 1, uint64(*keys-1))
	seq := make([]int, *requests)
	for i := range seq {
		seq[i] = base + int(z.Uint64())
	}
	// The ideal: every key's first n requests reach the origin (one to fill, after n-1 that only
	// count toward admission), every later one is redirected.
	seen := map[int]uint32{}
	var mustReach int
	for _, k := range seq {
		if seen[k] < n {
			seen[k]++
			mustReach++
		}
	}
	ideal := 1 - float64(mustReach)/float64(len(seq))
	redirectsBefore := noFollow.redirects.Load()
	zr := loadstat.Run(*conc, time.Hour, int64(*requests), func(w, i int) (int64, error) {
		k := seq[(w+i**conc)%len(seq)]
		n, err := noFollow.command(ctx, args(k, *zipfSize), rr)
		return n, err
	})
	redirected := int(noFollow.redirects.Load() - redirectsBefore)
	total := int64(zr.Ops) * int64(*zipfSize)
	originBytes := s.Origin.ObjectBytes() - before
	// Fills still in flight when the run ends are not counted; wait for the agent's uploads.
	time.Sleep(2 * time.Second)
	fmt.Printf("zipf(1.1), min_occurrences %d: %d objects stored\n", n, countObjects(ctx, s)-stored)
	fmt.Printf("zipf(1.1): %d requests over %d keys, %d B each, %s, %d redirected\n", zr.Ops, *keys, *zipfSize, zr.Elapsed.Round(time.Millisecond), redirected)
	saved := 1 - float64(originBytes)/float64(total)
	fmt.Printf("origin bytes %d of %d requested: %.1f%% saved; ideal %.1f%% (%d distinct keys), %.3f of the ideal\n",
		originBytes, total, 100*saved, 100*ideal, len(seen), saved/ideal)
}

// redirectOnly sends a command and reads the answer without fetching a location: what the agent
// and the origin do, not what the store does.
type redirectOnly struct {
	c         *hgclient.Client
	redirects atomic.Int64
}

func (r *redirectOnly) command(ctx context.Context, args map[string]any, rr *wire.RedirectRequest) (int64, error) {
	res, err := r.c.CommandNoFollow(ctx, "manifestdata", args, rr)
	if err != nil {
		return 0, err
	}
	if res.Redirected {
		r.redirects.Add(1)
	}
	return int64(len(res.Objects)), nil
}

func waitReady(s *devstack.Stack, n int) {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		list, err := s.Admin.ListObjects(context.Background(), &pb.ListObjectsRequest{PageSize: 1000})
		if err == nil && len(list.Objects) >= n {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	check(fmt.Errorf("objects not READY within 30s"))
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "agentload:", err)
		os.Exit(1)
	}
}

// countObjects counts the READY objects in the index.
func countObjects(ctx context.Context, s *devstack.Stack) int {
	n, token := 0, ""
	for {
		resp, err := s.Admin.ListObjects(ctx, &pb.ListObjectsRequest{PageSize: 1000, PageToken: token})
		check(err)
		n += len(resp.Objects)
		if token = resp.NextPageToken; token == "" {
			return n
		}
	}
}
