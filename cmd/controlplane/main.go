// Command controlplane runs Detour's control plane: the Placement and Admin gRPC services over an
// etcd cluster, or over an embedded etcd when no endpoints are given.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/controlplane"
	"github.com/detourhq/detour/internal/targets"
)

func main() {
	var (
		o           controlplane.Options
		endpoints   string
		signingKey  string
		logLevel    string
		verifyFills string
		drain       time.Duration
	)
	flag.StringVar(&o.Listen, "listen", "127.0.0.1:7700", "gRPC listen address")
	flag.StringVar(&o.MetricsListen, "metrics-listen", "127.0.0.1:7701", "Prometheus /metrics listen address (empty: none)")
	flag.StringVar(&endpoints, "etcd-endpoints", "", "comma-separated etcd client URLs; empty starts an embedded etcd in --data-dir")
	flag.StringVar(&o.EtcdPrefix, "etcd-prefix", targets.DefaultPrefix, "etcd key prefix for Detour's state")
	flag.StringVar(&o.DataDir, "data-dir", "detour-data", "directory of the embedded etcd")
	flag.StringVar(&o.EmbeddedEtcdURL, "embedded-etcd-listen", "", "client URL of the embedded etcd (default: a free loopback port)")
	flag.StringVar(&o.Region, "region", "", "this replica's region (for logs)")
	flag.StringVar(&signingKey, "signing-key", "", "service-account JSON key that signs V4 URLs for targets that want them")
	flag.StringVar(&o.GCSEndpoint, "gcs-endpoint", "", "GCS API endpoint (an emulator); empty: Google Cloud Storage with the standard Google credentials. Fills are verified, targets probed and retired objects deleted through it")
	flag.StringVar(&verifyFills, "verify-fills", "attrs", "how reported fills are verified before READY: attrs (size, CRC32C, generation and recorded hashes from the store), full (also re-read and re-hash the bytes), or a fraction 0..1 of fills to verify in full")
	flag.DurationVar(&o.Janitor.SweepInterval, "sweep-interval", 30*time.Second, "how often expired and stale records are retired and their stored bytes deleted")
	flag.DurationVar(&o.Janitor.ReconcileInterval, "reconcile-interval", 10*time.Minute, "how often each target's bucket is listed against the index (missing objects, orphans)")
	flag.DurationVar(&o.Janitor.ProbeInterval, "probe-interval", 2*time.Second, "how often each target's client-facing URL is probed")
	flag.IntVar(&o.Janitor.ProbeFailures, "probe-failures", 3, "consecutive probe failures that make a target unhealthy")
	flag.IntVar(&o.Janitor.ProbeRecoveries, "probe-recoveries", 2, "consecutive probe successes that make an unhealthy target healthy again")
	flag.IntVar(&o.Janitor.GarbageBatch, "garbage-batch", 500, "stored objects deleted per sweep at most")
	flag.Float64Var(&o.Janitor.CopyRate, "copy-rate", 5, "server-side copies the elected janitor starts per second at most: draining targets' sole copies and cross-region copies together")
	flag.DurationVar(&o.Janitor.CopyInterval, "copy-interval", 2*time.Second, "how often each replica queues the cross-region copies its redirect counts call for, and the janitor works through copies")
	flag.IntVar(&o.Janitor.HotKeys, "hot-keys", 100000, "(key, region) pairs each replica counts cross-region redirects for (about 120 bytes each)")
	flag.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	flag.DurationVar(&drain, "shutdown-timeout", 10*time.Second, "how long in-flight RPCs may run after SIGTERM")
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "controlplane: --log-level: %v\n", err)
		os.Exit(2)
	}
	o.Log = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if endpoints != "" {
		o.EtcdEndpoints = strings.Split(endpoints, ",")
	}
	switch verifyFills {
	case "attrs":
	case "full":
		o.VerifyFullFraction = 1
	default:
		f, err := strconv.ParseFloat(verifyFills, 64)
		if err != nil || f < 0 || f > 1 {
			fmt.Fprintf(os.Stderr, "controlplane: --verify-fills: %q is not attrs, full or a fraction between 0 and 1\n", verifyFills)
			os.Exit(2)
		}
		o.VerifyFullFraction = f
	}
	if o.Janitor.CopyRate <= 0 {
		fmt.Fprintf(os.Stderr, "controlplane: --copy-rate: %v is not a positive rate\n", o.Janitor.CopyRate)
		os.Exit(2)
	}
	if signingKey != "" {
		s, err := blob.LoadServiceAccount(signingKey)
		if err != nil {
			o.Log.Error("cannot load --signing-key", "err", err)
			os.Exit(2)
		}
		o.Signer = s
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	startCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	inst, err := controlplane.Start(startCtx, o)
	cancel()
	if err != nil {
		o.Log.Error("control plane failed to start", "err", err)
		os.Exit(1)
	}
	select {
	case <-ctx.Done():
		o.Log.Info("shutting down", "timeout", drain.String())
	case err := <-inst.Err():
		o.Log.Error("listener failed", "err", err)
	}
	sctx, scancel := context.WithTimeout(context.Background(), drain)
	defer scancel()
	inst.Shutdown(sctx)
}
