// Command authload measures what the origin access check (DESIGN invariant 9) costs the agent,
// on the whole in-process stack (control plane on embedded etcd, GCS emulator, the demo origin
// behind HTTP basic authentication, and two agents on the same control plane and origin: one
// checking, one started without an access probe):
//
//   - warm: redirect answers per second for one client whose answer is cached, against the agent
//     that does not check, measured alternately in the same run; the ratio is the check's cost;
//   - miss: the same with a new credential on every request (a token per request, or Digest
//     authentication), so that every request waits for one check at the origin.
package main

import (
	"context"
	"encoding/base64"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/bench/loadstat"
	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/demoorigin"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/front/hgv2"
	"github.com/detourhq/detour/internal/hgclient"
	"github.com/detourhq/detour/internal/wire"
)

func main() {
	dur := flag.Duration("duration", 3*time.Second, "time per measurement")
	rounds := flag.Int("rounds", 3, "alternating rounds of check on / check off")
	conc := flag.Int("concurrency", 16, "concurrent clients")
	hot := flag.Int("hot", 100, "READY keys")
	size := flag.Int("size", 64<<10, "response size")
	flag.Parse()
	ctx := context.Background()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))

	// The origin admits user "bench" with any password that starts with "ok", as an origin with
	// per-client tokens admits many credentials.
	var originChecks atomic.Int64
	demo := demoorigin.New(*size)
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && r.Header.Get("X-HgUpgrade-1") == "" {
			originChecks.Add(1)
		}
		if user, pass, ok := r.BasicAuth(); !ok || user != "bench" || !strings.HasPrefix(pass, "ok") {
			w.Header().Set("WWW-Authenticate", `Basic realm="bench"`)
			http.Error(w, "authorization required", http.StatusUnauthorized)
			return
		}
		demo.ServeHTTP(w, r)
	}))
	defer origin.Close()

	dir, err := os.MkdirTemp("", "authload")
	check(err)
	defer os.RemoveAll(dir)
	var cfg agent.Config
	s, err := devstack.Start(ctx, devstack.Options{DataDir: dir, OriginURL: origin.URL + "/", PlaceTimeout: time.Second, Log: quiet,
		AgentConfig: func(c *agent.Config) { cfg = *c }})
	check(err)
	defer s.Close(ctx)
	// The second agent: the same configuration, without the check.
	cfg.Access = nil
	off, err := agent.New(ctx, cfg)
	check(err)
	offV2, err := hgv2.New(off, hgv2.Config{})
	check(err)
	off.Mount(offV2)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	go off.Serve(lis)
	defer off.Shutdown(ctx)
	for off.Targets() == nil || len(off.Targets().Live) == 0 {
		time.Sleep(10 * time.Millisecond)
	}

	httpc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}}
	auth := func(pass string) http.Header {
		return http.Header{"Authorization": {"Basic " + base64.StdEncoding.EncodeToString([]byte("bench:"+pass))}}
	}
	on := &hgclient.Client{Base: s.AgentURL, HTTP: httpc, Header: auth("ok-warm")}
	offc := &hgclient.Client{Base: "http://" + lis.Addr().String() + "/", HTTP: httpc, Header: auth("ok-warm")}
	hs, err := on.Capabilities(ctx)
	check(err)
	rr := &wire.RedirectRequest{Targets: hgclient.Accepted(hs.Redirect, "http", "https"), Hashes: []string{"sha256", "sha1"}}
	args := func(k int) map[string]any {
		return map[string]any{"nodes": []any{fmt.Sprintf("%020d", k)}, "tree": "", "size": uint64(*size)}
	}
	for k := range *hot {
		_, err := on.Command(ctx, "manifestdata", args(k), rr)
		check(err)
	}
	waitReady(s, *hot)
	host, _ := os.Hostname()
	fmt.Printf("authload: host %s, %d CPUs, concurrency %d, %s per measurement, %d rounds\n\n", host, runtime.NumCPU(), *conc, *dur, *rounds)

	redirects := func(c *hgclient.Client, header func(w, i int) http.Header) loadstat.Result {
		return loadstat.Run(*conc, *dur, 0, func(w, i int) (int64, error) {
			cc := *c
			if header != nil {
				cc.Header = header(w, i)
			}
			res, err := cc.CommandNoFollow(ctx, "manifestdata", args((w*31+i)%*hot), rr)
			if err != nil {
				return 0, err
			}
			if !res.Redirected {
				return 0, fmt.Errorf("not redirected")
			}
			return 0, nil
		})
	}
	var onSum, offSum, missSum float64
	var warmRatios, missRatios []float64
	var n atomic.Int64 // the miss rounds' credentials, never one twice
	for round := range *rounds {
		before := originChecks.Load()
		r1 := redirects(on, nil)
		warmChecks := originChecks.Load() - before
		r2 := redirects(offc, nil)
		before = originChecks.Load()
		r3 := redirects(on, func(w, i int) http.Header { return auth(fmt.Sprintf("ok-%d", n.Add(1))) })
		missChecks := originChecks.Load() - before
		fmt.Printf("round %d\n", round+1)
		fmt.Printf("  check on, cache warm     %s  (%d origin checks)\n", r1, warmChecks)
		fmt.Printf("  check off                %s\n", r2)
		fmt.Printf("  check on, every request a new credential %s  (%d origin checks)\n", r3, missChecks)
		onSum, offSum, missSum = onSum+r1.PerSecond(), offSum+r2.PerSecond(), missSum+r3.PerSecond()
		warmRatios = append(warmRatios, r1.PerSecond()/r2.PerSecond())
		missRatios = append(missRatios, r3.PerSecond()/r2.PerSecond())
	}
	fmt.Printf("\nmean over %d rounds: warm %.0f/s, off %.0f/s, miss %.0f/s\n", *rounds, onSum/float64(*rounds), offSum/float64(*rounds), missSum/float64(*rounds))
	fmt.Printf("ratio check on (warm) / check off: %.2f (median of the rounds' ratios %.2f)\n", onSum/offSum, median(warmRatios))
	fmt.Printf("ratio check on (every request a miss) / check off: %.2f (median %.2f)\n", missSum/offSum, median(missRatios))
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
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
		fmt.Fprintln(os.Stderr, "authload:", err)
		os.Exit(1)
	}
}
