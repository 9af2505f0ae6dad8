// Command agent runs Detour's wire-protocol front in front of one origin server.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/blob"
)

func main() {
	hostname, _ := os.Hostname()
	var (
		listen, metricsListen, origin, controlPlane string
		region, agentID, repoID, cacheable          string
		gcsEndpoint, logLevel                       string
		placeTimeout, drain                         time.Duration
		fillQueue                                   int64
	)
	flag.StringVar(&listen, "listen", "127.0.0.1:8080", "HTTP listen address for clients")
	flag.StringVar(&metricsListen, "metrics-listen", "127.0.0.1:8081", "Prometheus /metrics listen address (empty: none)")
	flag.StringVar(&origin, "origin", "", "base URL of the origin server (required), e.g. http://127.0.0.1:8000/")
	flag.StringVar(&controlPlane, "controlplane", "127.0.0.1:7700", "comma-separated control-plane addresses (round-robin); empty: no redirects")
	flag.StringVar(&region, "region", "", "this agent's region")
	flag.StringVar(&agentID, "agent-id", hostname, "this agent's id in fill claims")
	flag.StringVar(&repoID, "repo-id", "", "identity of the origin's repository in content keys (default: the origin URL)")
	flag.DurationVar(&placeTimeout, "place-timeout", 50*time.Millisecond, "deadline of each Place call; past it the answer is inline")
	flag.StringVar(&cacheable, "cacheable-commands", strings.Join(agent.DefaultCacheable, ","), "commands whose responses may be redirected")
	flag.StringVar(&gcsEndpoint, "gcs-endpoint", "", "GCS API endpoint (an emulator); empty: STORAGE_EMULATOR_HOST or Google Cloud Storage with default credentials")
	flag.Int64Var(&fillQueue, "fill-queue-bytes", 64<<20, "bytes a fill may fall behind the client before it is aborted")
	flag.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	flag.DurationVar(&drain, "shutdown-timeout", 30*time.Second, "how long in-flight responses and fills may run after SIGTERM")
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		fail("--log-level: %v", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if origin == "" {
		fail("--origin is required")
	}
	originURL, err := url.Parse(origin)
	if err != nil || originURL.Scheme == "" || originURL.Host == "" {
		fail("--origin %q is not an absolute URL", origin)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cfg := agent.Config{Origin: originURL, RepoID: repoID, Region: region, AgentID: agentID, PlaceTimeout: placeTimeout,
		Cacheable: strings.Split(cacheable, ","), FillQueueBytes: fillQueue, Log: log}
	if controlPlane != "" {
		conn, err := agent.DialControlPlane(strings.Split(controlPlane, ","))
		if err != nil {
			fail("--controlplane: %v", err)
		}
		defer conn.Close()
		cfg.Placement = pb.NewPlacementServiceClient(conn)
		store, err := blob.NewStore(ctx, blob.Options{Endpoint: gcsEndpoint})
		if err != nil {
			log.Warn("no storage client; fills disabled", "err", err)
		} else {
			defer store.Close()
			cfg.Store = store
		}
	}
	a, err := agent.New(cfg)
	if err != nil {
		fail("%v", err)
	}
	runCtx, cancelRun := context.WithCancel(context.Background())
	watchDone := make(chan struct{})
	go func() { a.Run(runCtx); close(watchDone) }()

	lis, err := net.Listen("tcp", listen)
	if err != nil {
		fail("--listen: %v", err)
	}
	srv := &http.Server{Handler: a, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(lis) }()
	var msrv *http.Server
	if metricsListen != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(a.Metrics().Registry, promhttp.HandlerOpts{}))
		msrv = &http.Server{Addr: metricsListen, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { errc <- msrv.ListenAndServe() }()
	}
	log.Info("agent serving", "listen", lis.Addr().String(), "origin", originURL.String(), "controlplane", controlPlane,
		"region", region, "agent_id", agentID, "place_timeout", placeTimeout)
	select {
	case <-ctx.Done():
		log.Info("shutting down", "timeout", drain.String())
	case err := <-errc:
		if !errors.Is(err, http.ErrServerClosed) {
			log.Error("listener failed", "err", err)
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	_ = srv.Shutdown(sctx) // in-flight responses finish
	if err := a.Shutdown(sctx); err != nil {
		log.Warn("fills still running at shutdown were aborted", "err", err)
	}
	cancelRun()
	<-watchDone
	if msrv != nil {
		_ = msrv.Shutdown(sctx)
	}
	log.Info("agent stopped")
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "agent: "+format+"\n", args...)
	os.Exit(2)
}
