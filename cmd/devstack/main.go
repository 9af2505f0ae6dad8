// Command devstack runs the whole of Detour in one process on embedded defaults (what `make run`
// starts): a control plane on an embedded etcd, an in-process GCS-compatible store, the demo
// origin and an agent, with one target registered.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/hgserve"
)

func main() {
	var o devstack.Options
	var logLevel, hgRepo, hgPath, regions, regionAgents string
	flag.StringVar(&o.DataDir, "data-dir", "detour-data/devstack", "embedded etcd data directory")
	flag.StringVar(&o.PKIDir, "pki-dir", "detour-data/pki", "development CA and certificates (mutual TLS everywhere), made if absent; detourctl finds them here")
	flag.StringVar(&o.ControlPlane, "controlplane-listen", "127.0.0.1:7700", "control-plane gRPC address")
	flag.StringVar(&o.CPMetrics, "metrics-listen", "127.0.0.1:7701", "control-plane /metrics address")
	flag.StringVar(&o.Agent, "agent-listen", "127.0.0.1:8080", "agent HTTP address (what clients use)")
	flag.StringVar(&o.AgentMetrics, "agent-metrics-listen", "127.0.0.1:8081", "agent /metrics address")
	flag.StringVar(&o.Origin, "origin-listen", "127.0.0.1:8000", "demo origin HTTP address")
	flag.IntVar(&o.GCSPort, "gcs-port", 4443, "port of the in-process GCS emulator")
	flag.StringVar(&o.StoreDir, "gcs-dir", "", "where the GCS emulator keeps its objects, so that they outlive a restart (default <data-dir>/gcs; \"memory\": in memory)")
	flag.IntVar(&o.ObjectSize, "object-size", 1<<20, "default response size of the demo origin")
	flag.Uint64Var(&o.MinRedirect, "min-redirect-bytes", 0, "policy: smaller responses stay inline")
	flag.Func("min-occurrences", "policy: fill a key on its Nth miss (default 1, so that a key's second request is a redirect)", func(v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		o.MinOccurrences = uint32(n)
		return err
	})
	flag.DurationVar(&o.PlaceTimeout, "place-timeout", 50*time.Millisecond, "agent's Place deadline")
	flag.StringVar(&regions, "regions", "", "comma-separated regions (e.g. us,eu): a bucket, a target <region>-gcs and an agent in each, against one control plane; data in <data-dir>-regions")
	flag.StringVar(&regionAgents, "region-agents-listen", "127.0.0.1:8080,127.0.0.1:8090,127.0.0.1:8092", "with --regions: each region's agent HTTP address, in order")
	flag.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	flag.StringVar(&hgRepo, "hg-repo", "", "a Mercurial repository to serve as the origin with a real `hg serve` instead of the demo origin: Mercurial 5.6.1 from `make hg` with protocol v2 on when it reads the repository, else the hg on PATH (clone bundles only)")
	flag.StringVar(&hgPath, "hg", "", "the hg to serve --hg-repo with (default: $DETOUR_HG, else ./bin/hg from `make hg` if it reads the repository, else hg on PATH); protocol v2 is on when it has it")
	flag.Parse()
	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "devstack: --log-level: %v\n", err)
		os.Exit(2)
	}
	o.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if regions != "" {
		o.Regions, o.RegionAgents = strings.Split(regions, ","), strings.Split(regionAgents, ",")
		if len(o.Regions) < 2 {
			fmt.Fprintln(os.Stderr, "devstack: --regions needs at least two regions (one region is the default setup)")
			os.Exit(2)
		}
		// Another run's single-region target would linger in the same etcd.
		o.DataDir += "-regions"
	}
	switch o.StoreDir {
	case "":
		o.StoreDir = filepath.Join(o.DataDir, "gcs")
	case "memory":
		o.StoreDir = ""
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var hg *hgserve.Server
	var hgBin string
	if hgRepo != "" {
		var err error
		if hg, hgBin, err = serveRepo(ctx, hgPath, hgRepo, &o); err != nil {
			fmt.Fprintf(os.Stderr, "devstack: --hg-repo: %v\n", err)
			os.Exit(1)
		}
		defer hg.Close()
	}
	startCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	s, err := devstack.Start(startCtx, o)
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "devstack: %v\n", err)
		os.Exit(1)
	}
	switch {
	case hg != nil:
		printHgBanner(s, o, hgRepo, hgBin)
	case len(o.Regions) > 0:
		printRegionsBanner(s, o)
	default:
		printBanner(s, o)
	}
	select {
	case <-ctx.Done():
	case err := <-s.CP.Err():
		fmt.Fprintf(os.Stderr, "devstack: control plane listener: %v\n", err)
	}
	fmt.Println("stopping…")
	sctx, scancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer scancel()
	s.Close(sctx)
}

// serveRepo starts `hg serve` on repo and points the stack at it: with Mercurial 5.6.1 (./bin/hg,
// or --hg) and protocol v2 on when that Mercurial reads the repository, so that both fronts can be
// tried; else (a repository made by Mercurial 6 or later, which 5.6.1 refuses) with the machine's
// own hg, for clone bundles. It returns the hg it serves with.
func serveRepo(ctx context.Context, hg, repo string, o *devstack.Options) (*hgserve.Server, string, error) {
	abs, err := filepath.Abs(repo)
	if err != nil {
		return nil, "", err
	}
	if _, err := os.Stat(filepath.Join(abs, ".hg")); err != nil {
		return nil, "", fmt.Errorf("%s is not a Mercurial repository", abs)
	}
	v2 := true
	if hg == "" {
		hg, err = hgserve.Find(".")
		if err == nil {
			if _, rerr := hgserve.Run(ctx, hg, abs, "root"); rerr != nil {
				err = rerr
			}
		}
		if err != nil {
			// No 5.6.1, or one that cannot read this repository: the machine's Mercurial.
			sys, lerr := exec.LookPath("hg")
			if lerr != nil {
				return nil, "", fmt.Errorf("no Mercurial can serve %s: %v; and no hg on PATH", abs, err)
			}
			hg, v2 = sys, false
		}
	} else if v, verr := hgserve.Version(hg); verr != nil || !hgserve.HasV2(v) {
		v2 = false
	}
	logDir := filepath.Join(o.DataDir, "hg-serve")
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, "", err
	}
	srv, err := hgserve.Serve(ctx, hg, abs, hgserve.Options{Listen: o.Origin, V2: v2, Dir: logDir})
	if err != nil {
		return nil, "", err
	}
	o.OriginURL = srv.URL
	// The repository, not the port it is served on this time, names its content.
	o.RepoID = "hg:" + abs
	return srv, hg, nil
}

func printHgBanner(s *devstack.Stack, o devstack.Options, repo, hg string) {
	version, _ := hgserve.Version(hg)
	fmt.Printf(`
Detour is running in front of a real hg serve (Ctrl-C stops it):
  agent (clients connect here)  %s
  origin: hg serve (Mercurial %s) of %s   %s   access log %s/hg-serve/access.log
  control plane (gRPC)          %s   metrics http://%s/metrics
  GCS emulator                  http://%s   bucket %s, target %q

Clone through the agent with any Mercurial since 3.6 (clone bundles; hg on this machine is fine):
  hg clone %s /tmp/detour-clone-1
  hg clone --verbose %s /tmp/detour-clone-2 | grep 'clone bundle'
The first clone is normal while the agent makes the repository's bundle (zstd and gzip) and stores
it; once the control plane has verified it, later clones apply it from the store ("applying clone
bundle from http://%s/...") and pull only what came after it from the origin.
`, s.AgentURL, version, repo, s.OriginURL, o.DataDir, s.CP.Addr(), s.CP.MetricsAddr(), s.GCS.Host(), s.Target().Store.Bucket, s.Target().Name,
		s.AgentURL, s.AgentURL, s.GCS.Host())
	if v, err := hgserve.Version(hg); err == nil && hgserve.HasV2(v) {
		fmt.Printf(`
Protocol v2 (Mercurial 4.8 to 5.9, make hg installs 5.6.1 as ./bin/hg) gets content redirects per
command instead:
  ./bin/hg clone --config experimental.httppeer.advertise-v2=true %s /tmp/detour-clone-3
  ./bin/hg clone --debug --config experimental.httppeer.advertise-v2=true %s /tmp/detour-clone-4 | grep 'following redirect'
`, s.AgentURL, s.AgentURL)
	}
	fmt.Printf(`Then:
  go run ./cmd/detourctl objects ls
  curl -s http://%s/metrics | grep -E 'detour_agent_(requests|bundle_manifests)_total'

`, o.AgentMetrics)
}

func printBanner(s *devstack.Stack, o devstack.Options) {
	fmt.Printf(`
Detour is running (Ctrl-C stops it):
  agent (clients connect here)  %s
  demo origin                   %s
  control plane (gRPC, mTLS)    %s   metrics http://%s/metrics
  embedded etcd (mutual TLS)    %s   data in %s
  certificates (throwaway CA)   %s   (detourctl uses operator.pem from here)
  GCS emulator                  http://%s   bucket %s, target %q   objects in %s

Try, in another terminal:
  go run ./cmd/detourctl probe --agent %s      # first time: inline, and the agent fills the store
  go run ./cmd/detourctl probe --agent %s      # again: a redirect, fetched and verified
  go run ./cmd/detourctl probe --agent %s --no-redirect
  go run ./cmd/detourctl targets list
  go run ./cmd/detourctl objects ls
  go run ./cmd/detourctl targets drain local-gcs
  grpcurl -cacert %s/ca.pem -cert %s/operator.pem -key %s/operator-key.pem %s list
  etcdctl --endpoints %s --cacert %[20]s/ca.pem --cert %[20]s/client.pem --key %[20]s/client-key.pem endpoint status -w table

`, s.AgentURL, s.OriginURL, s.CP.Addr(), s.CP.MetricsAddr(), s.CP.EtcdEndpoint(), o.DataDir, s.PKI.Dir, s.GCS.Host(), "detour-demo",
		s.Target().Name, storeWhere(o), s.AgentURL, s.AgentURL, s.AgentURL, s.PKI.Dir, s.PKI.Dir, s.PKI.Dir, s.CP.Addr(), s.CP.EtcdEndpoint(), etcdPKI(s))
}

func printRegionsBanner(s *devstack.Stack, o devstack.Options) {
	fmt.Printf(`
Detour is running in %d regions against one control plane (Ctrl-C stops it):
`, len(s.Regions))
	for _, r := range s.Regions {
		fmt.Printf("  region %-4s agent %s   target %s (bucket %s)   agent identity %s\n", r.Name, r.AgentURL, r.Target, r.Bucket, r.AgentID)
	}
	us, eu := s.Regions[0], s.Regions[1]
	fmt.Printf(`  demo origin %s   control plane (gRPC, mTLS) %s   metrics http://%s/metrics
  GCS emulator http://%s   data in %s   certificates in %s

Try, in another terminal (the location URL's bucket shows which region's copy serves):
  go run ./cmd/detourctl probe --agent %s --node %s-demo    # inline; the %s agent fills %s
  go run ./cmd/detourctl probe --agent %s --node %s-demo    # a redirect to %s, in the agent's region
  go run ./cmd/detourctl probe --agent %s --node %s-demo    # inline; the %s agent fills %s
  go run ./cmd/detourctl probe --agent %s --node %s-demo    # a redirect to %s
  go run ./cmd/detourctl agents ls
Drain the %s target: its copies are copied to the other region, which then serves them:
  go run ./cmd/detourctl targets drain %s
  go run ./cmd/detourctl probe --agent %s --node %s-demo --explain   # after a few seconds: a redirect to %s
  go run ./cmd/detourctl targets activate %s

`, s.OriginURL, s.CP.Addr(), s.CP.MetricsAddr(), s.GCS.Host(), o.DataDir, s.PKI.Dir,
		us.AgentURL, us.Name, us.Name, us.Target,
		us.AgentURL, us.Name, us.Target,
		eu.AgentURL, eu.Name, eu.Name, eu.Target,
		eu.AgentURL, eu.Name, eu.Target,
		us.Name, us.Target, us.AgentURL, us.Name, eu.Target, us.Target)
}

// storeWhere says where the emulator keeps its objects.
func storeWhere(o devstack.Options) string {
	if o.StoreDir == "" {
		return "memory"
	}
	return o.StoreDir
}

// etcdPKI is the directory of the embedded etcd's certificates (etcdctl needs them).
func etcdPKI(s *devstack.Stack) string {
	if e := s.CP.EmbeddedEtcd(); e != nil {
		return e.PKI().Dir
	}
	return "(external etcd)"
}
