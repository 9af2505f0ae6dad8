package controlplane

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/etcdembed"
	"github.com/detourhq/detour/internal/targets"
)

// Options are everything a control-plane process is started with. Zero fields take defaults.
type Options struct {
	Listen          string   // gRPC address (default 127.0.0.1:7700)
	MetricsListen   string   // Prometheus /metrics address; empty: no metrics listener
	EtcdEndpoints   []string // empty: start an embedded etcd in DataDir
	EtcdPrefix      string   // default targets.DefaultPrefix
	DataDir         string   // embedded etcd data (default ./detour-data)
	EmbeddedEtcdURL string   // embedded etcd client URL (default: a free loopback port)
	Region          string
	Signer          *blob.Signer
	// GCSEndpoint is a GCS-API endpoint (an emulator); empty: Google Cloud Storage with the
	// standard Google credentials. The control plane verifies fills, probes targets and deletes
	// retired objects through it; without store access it grants no fills and redirects nothing.
	GCSEndpoint string
	// VerifyFullFraction is the share of fills re-read and re-hashed before READY (0..1).
	VerifyFullFraction float64
	Janitor            JanitorConfig
	// ID names this replica in the janitor election (default host:pid:listen address).
	ID           string
	WriteTimeout time.Duration // bound on each etcd write an RPC makes (default 5s)
	Log          *slog.Logger
}

// Instance is a running control plane.
type Instance struct {
	Service  *Service
	grpc     *grpc.Server
	health   *health.Server
	lis      net.Listener
	metrics  *http.Server
	mlis     net.Listener
	cli      *clientv3.Client
	etcd     *etcdembed.Server
	store    *blob.Store
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	log      *slog.Logger
	serveErr chan error
}

// Start brings up etcd (embedded if no endpoints), the snapshot watcher, the gRPC server and the
// metrics listener, and returns once the first snapshot is loaded and the listeners are bound.
func Start(ctx context.Context, o Options) (inst *Instance, err error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Listen == "" {
		o.Listen = "127.0.0.1:7700"
	}
	if o.DataDir == "" {
		o.DataDir = "detour-data"
	}
	in := &Instance{log: o.Log, serveErr: make(chan error, 2)}
	defer func() {
		if err != nil {
			in.closeBackends()
		}
	}()
	endpoints := o.EtcdEndpoints
	if len(endpoints) == 0 {
		dir := filepath.Join(o.DataDir, "etcd")
		in.etcd, err = etcdembed.Start(ctx, etcdembed.Config{Dir: dir, ClientURL: o.EmbeddedEtcdURL})
		if err != nil {
			return nil, err
		}
		endpoints = []string{in.etcd.Endpoint()}
		o.Log.Info("embedded etcd started", "dir", dir, "endpoint", in.etcd.Endpoint())
	}
	in.cli, err = clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second,
		DialKeepAliveTime: 10 * time.Second, DialKeepAliveTimeout: 5 * time.Second, AutoSyncInterval: time.Minute,
		// etcd client retries log at warn on every attempt; Detour logs each cause once itself.
		Logger: zap.NewNop()})
	if err != nil {
		return nil, fmt.Errorf("etcd client for %v: %w", endpoints, err)
	}
	cfg := Config{Log: o.Log, Signer: o.Signer, WriteTimeout: o.WriteTimeout, VerifyFullFraction: o.VerifyFullFraction, Janitor: o.Janitor}
	if in.store, err = blob.NewStore(ctx, blob.Options{Endpoint: o.GCSEndpoint}); err != nil {
		o.Log.Error("no access to the stores: no fills will be granted and no target becomes healthy (nothing is redirected)", "err", err)
	} else {
		cfg.Store = in.store
	}
	if o.ID == "" {
		host, _ := os.Hostname()
		o.ID = fmt.Sprintf("%s:%d:%s", host, os.Getpid(), o.Listen)
	}
	reg := targets.NewRegistry(in.cli, o.EtcdPrefix)
	w := targets.NewWatcher(in.cli, reg.Prefix(), o.Log)
	in.Service = NewService(reg, w, cfg)

	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	in.cancel = cancel
	in.wg.Add(4)
	go func() { defer in.wg.Done(); w.Run(runCtx) }()
	go func() { defer in.wg.Done(); in.Service.RunJanitor(runCtx, in.cli, o.ID) }()
	go func() { defer in.wg.Done(); in.Service.runExtensions(runCtx, in.Service.cfg.Janitor.ExtendInterval) }()
	go func() { defer in.wg.Done(); in.Service.runCopyRequests(runCtx, in.Service.cfg.Janitor.CopyInterval) }()
	select {
	case <-w.Ready():
	case <-ctx.Done():
		in.stopLoops()
		return nil, fmt.Errorf("waiting for the first snapshot from etcd %v: %w", endpoints, ctx.Err())
	}

	in.lis, err = net.Listen("tcp", o.Listen)
	if err != nil {
		in.stopLoops()
		return nil, fmt.Errorf("listen %s: %w", o.Listen, err)
	}
	m := in.Service.Metrics()
	in.grpc = grpc.NewServer(
		grpc.ChainUnaryInterceptor(m.unary),
		grpc.ChainStreamInterceptor(m.stream),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
	)
	pb.RegisterPlacementServiceServer(in.grpc, in.Service)
	pb.RegisterAdminServiceServer(in.grpc, in.Service)
	in.health = health.NewServer()
	healthpb.RegisterHealthServer(in.grpc, in.health)
	reflection.Register(in.grpc)
	in.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	go func() { in.serveErr <- in.grpc.Serve(in.lis) }()

	if o.MetricsListen != "" {
		in.mlis, err = net.Listen("tcp", o.MetricsListen)
		if err != nil {
			in.grpc.Stop()
			in.stopLoops()
			return nil, fmt.Errorf("listen %s: %w", o.MetricsListen, err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
		in.metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { in.serveErr <- in.metrics.Serve(in.mlis) }()
	}
	o.Log.Info("control plane serving", "grpc", in.lis.Addr().String(), "metrics", o.MetricsListen,
		"region", o.Region, "etcd", endpoints, "prefix", reg.Prefix(), "revision", w.Snapshot().Revision)
	return in, nil
}

// Addr is the gRPC listener's address.
func (in *Instance) Addr() string { return in.lis.Addr().String() }

// MetricsAddr is the metrics listener's address ("" if none).
func (in *Instance) MetricsAddr() string {
	if in.mlis == nil {
		return ""
	}
	return in.mlis.Addr().String()
}

// EtcdEndpoint is the embedded etcd's client URL ("" when using external etcd).
func (in *Instance) EtcdEndpoint() string {
	if in.etcd == nil {
		return ""
	}
	return in.etcd.Endpoint()
}

// Err reports a listener that stopped serving on its own.
func (in *Instance) Err() <-chan error { return in.serveErr }

// Shutdown stops accepting, lets in-flight RPCs finish until ctx ends (then cuts them, including
// open WatchTargets streams), and stops the watcher, the etcd client and any embedded etcd.
func (in *Instance) Shutdown(ctx context.Context) error {
	in.health.Shutdown()
	done := make(chan struct{})
	go func() { in.grpc.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		in.grpc.Stop()
		<-done
	}
	if in.metrics != nil {
		_ = in.metrics.Shutdown(ctx)
	}
	in.stopLoops()
	in.closeBackends()
	in.log.Info("control plane stopped")
	return nil
}

func (in *Instance) stopLoops() {
	if in.cancel != nil {
		in.cancel()
	}
	in.wg.Wait()
}

func (in *Instance) closeBackends() {
	if in.store != nil {
		in.store.Close()
	}
	if in.cli != nil {
		in.cli.Close()
	}
	if in.etcd != nil {
		in.etcd.Close()
	}
}
