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
	"os/signal"
	"syscall"
	"time"

	"github.com/detourhq/detour/internal/devstack"
)

func main() {
	var o devstack.Options
	var logLevel string
	flag.StringVar(&o.DataDir, "data-dir", "detour-data/devstack", "embedded etcd data directory")
	flag.StringVar(&o.ControlPlane, "controlplane-listen", "127.0.0.1:7700", "control-plane gRPC address")
	flag.StringVar(&o.CPMetrics, "metrics-listen", "127.0.0.1:7701", "control-plane /metrics address")
	flag.StringVar(&o.Agent, "agent-listen", "127.0.0.1:8080", "agent HTTP address (what clients use)")
	flag.StringVar(&o.Origin, "origin-listen", "127.0.0.1:8000", "demo origin HTTP address")
	flag.IntVar(&o.GCSPort, "gcs-port", 4443, "port of the in-process GCS emulator")
	flag.IntVar(&o.ObjectSize, "object-size", 1<<20, "default response size of the demo origin")
	flag.Uint64Var(&o.MinRedirect, "min-redirect-bytes", 0, "policy: smaller responses stay inline")
	flag.DurationVar(&o.PlaceTimeout, "place-timeout", 50*time.Millisecond, "agent's Place deadline")
	flag.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	flag.Parse()
	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "devstack: --log-level: %v\n", err)
		os.Exit(2)
	}
	o.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	startCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	s, err := devstack.Start(startCtx, o)
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "devstack: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf(`
Detour is running (Ctrl-C stops it):
  agent (clients connect here)  %s
  demo origin                   %s
  control plane (gRPC)          %s   metrics http://%s/metrics
  embedded etcd                 %s   data in %s
  GCS emulator                  http://%s   bucket %s, target %q

Try, in another terminal:
  go run ./cmd/detourctl probe --agent %s      # first time: inline, and the agent fills the store
  go run ./cmd/detourctl probe --agent %s      # again: a redirect, fetched and verified
  go run ./cmd/detourctl probe --agent %s --no-redirect
  go run ./cmd/detourctl targets list
  go run ./cmd/detourctl objects ls
  go run ./cmd/detourctl targets drain local-gcs
  grpcurl -plaintext %s list                   # if you have grpcurl

`, s.AgentURL, s.OriginURL, s.CP.Addr(), s.CP.MetricsAddr(), s.CP.EtcdEndpoint(), o.DataDir, s.GCS.Host(), "detour-demo",
		s.Target().Name, s.AgentURL, s.AgentURL, s.AgentURL, s.CP.Addr())
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
