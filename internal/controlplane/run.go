package controlplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/etcdembed"
	"github.com/detourhq/detour/internal/pki"
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
	ClaimTimeout time.Duration // bound on the fill-claim write inside Place (default 1s)
	// RedirectCacheMaxAge bounds how long agents reuse a redirect without asking (default 1m;
	// negative: they do not cache redirects).
	RedirectCacheMaxAge time.Duration
	// AgentLagThreshold is how long an agent's applied target set may be behind before it is
	// flagged lagging (default 30s).
	AgentLagThreshold time.Duration

	// TLS is the server's certificate and key and the CA that client certificates must chain to
	// (mutual TLS: every RPC but health checks needs a client certificate). Required unless
	// Insecure; the files are re-read when they change.
	TLS      pki.Files
	Insecure bool // plaintext, no authentication or authorization (development only)
	// AuthzPolicyFile is a gRPC authorization policy (JSON), re-read every AuthzRefresh (default
	// 10s); empty: DefaultAuthzPolicy.
	AuthzPolicyFile string
	AuthzRefresh    time.Duration
	// AdminListen, if set, serves AdminService (and reflection) on its own address, so operators
	// can firewall it apart from the agents' PlacementService on Listen.
	AdminListen string
	// ClaimRate and ClaimBurst bound the fill claims each agent identity may take per second
	// (defaults 100 and 200; a negative rate: unbounded).
	ClaimRate  float64
	ClaimBurst int
	// ClaimsInFlight is how many fill-claim transactions may be under way at once; claims that
	// arrive meanwhile are written together in the next one (group commit). Default 2; negative:
	// every claim is a transaction of its own.
	ClaimsInFlight int

	// Etcd is the TLS of the etcd client (CA, and a client certificate and key when etcd requires
	// them), with EtcdUsername/EtcdPassword for etcd's own authentication.
	EtcdTLS      pki.Files
	EtcdUsername string
	EtcdPassword string
	Log          *slog.Logger
}

// Instance is a running control plane.
type Instance struct {
	Service *Service
	grpc    *grpc.Server
	health  *health.Server
	lis     net.Listener
	// adminGRPC serves AdminService on alis when it has its own address.
	adminGRPC *grpc.Server
	alis      net.Listener
	closers   []func() // certificate and policy watchers
	metrics   *http.Server
	mlis      net.Listener
	cli       *clientv3.Client
	etcd      *etcdembed.Server
	store     *blob.Store
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	log       *slog.Logger
	serveErr  chan error
}

// AdminAddr is the address AdminService is served on (Addr unless it has its own listener).
func (in *Instance) AdminAddr() string {
	if in.alis != nil {
		return in.alis.Addr().String()
	}
	return in.Addr()
}

func (o *Options) setDefaults() {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Listen == "" {
		o.Listen = "127.0.0.1:7700"
	}
	if o.DataDir == "" {
		o.DataDir = "detour-data"
	}
	if o.ID == "" {
		host, _ := os.Hostname()
		o.ID = fmt.Sprintf("%s:%d:%s", host, os.Getpid(), o.Listen)
	}
	if o.AuthzRefresh <= 0 {
		o.AuthzRefresh = 10 * time.Second
	}
	if o.ClaimRate == 0 {
		o.ClaimRate = 100
	}
	if o.ClaimBurst <= 0 {
		o.ClaimBurst = 200
	}
	if o.ClaimsInFlight == 0 {
		o.ClaimsInFlight = 2
	}
}

// Start brings up etcd (embedded if no endpoints), the snapshot watcher and the janitor, the gRPC
// server and the metrics listener, and returns once the first snapshot is loaded and the
// listeners are bound.
func Start(ctx context.Context, o Options) (inst *Instance, err error) {
	o.setDefaults()
	in := &Instance{log: o.Log, serveErr: make(chan error, 2)}
	defer func() {
		if err != nil {
			in.stopLoops()
			in.closeBackends()
		}
	}()
	endpoints, err := in.startEtcd(ctx, o)
	if err != nil {
		return nil, err
	}
	if err := in.startService(ctx, o, endpoints); err != nil {
		return nil, err
	}
	if err := in.serveGRPC(o); err != nil {
		return nil, err
	}
	if err := in.serveMetrics(o); err != nil {
		in.grpc.Stop()
		return nil, err
	}
	o.Log.Info("control plane serving", "grpc", in.lis.Addr().String(), "metrics", o.MetricsListen,
		"region", o.Region, "etcd", endpoints, "prefix", in.Service.reg.Prefix(), "revision", in.Service.w.Snapshot().Revision)
	return in, nil
}

// startEtcd connects to etcd, starting an embedded one when no endpoints are given.
func (in *Instance) startEtcd(ctx context.Context, o Options) ([]string, error) {
	endpoints := o.EtcdEndpoints
	if len(endpoints) == 0 {
		dir := filepath.Join(o.DataDir, "etcd")
		var err error
		if in.etcd, err = etcdembed.Start(ctx, etcdembed.Config{Dir: dir, ClientURL: o.EmbeddedEtcdURL}); err != nil {
			return nil, err
		}
		endpoints = []string{in.etcd.Endpoint()}
		o.Log.Info("embedded etcd started", "dir", dir, "endpoint", in.etcd.Endpoint())
	}
	cfg := clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second,
		DialKeepAliveTime: 10 * time.Second, DialKeepAliveTimeout: 5 * time.Second, AutoSyncInterval: time.Minute,
		Username: o.EtcdUsername, Password: o.EtcdPassword,
		// etcd client retries log at warn on every attempt; Detour logs each cause once itself.
		Logger: zap.NewNop()}
	if o.EtcdTLS.CA != "" || o.EtcdTLS.Cert != "" {
		// etcd's own TLS helper re-reads the client certificate at every handshake.
		info := transport.TLSInfo{CertFile: o.EtcdTLS.Cert, KeyFile: o.EtcdTLS.Key, TrustedCAFile: o.EtcdTLS.CA}
		tc, err := info.ClientConfig()
		if err != nil {
			return nil, fmt.Errorf("etcd TLS: %w", err)
		}
		cfg.TLS = tc
	}
	var err error
	if in.cli, err = clientv3.New(cfg); err != nil {
		return nil, fmt.Errorf("etcd client for %v: %w", endpoints, err)
	}
	return endpoints, nil
}

// startService builds the service over the registry, starts the watcher, the janitor's campaign
// and the expiry extensions, and waits for the first snapshot.
func (in *Instance) startService(ctx context.Context, o Options, endpoints []string) error {
	cfg := Config{Log: o.Log, Signer: o.Signer, WriteTimeout: o.WriteTimeout, ClaimTimeout: o.ClaimTimeout,
		RedirectCacheMaxAge: o.RedirectCacheMaxAge, AgentLagThreshold: o.AgentLagThreshold, VerifyFullFraction: o.VerifyFullFraction, Janitor: o.Janitor}
	var err error
	if in.store, err = blob.NewStore(ctx, blob.Options{Endpoint: o.GCSEndpoint}); err != nil {
		o.Log.Error("no access to the stores: no fills will be granted and no target becomes healthy (nothing is redirected)", "err", err)
	} else {
		cfg.Store = in.store
	}
	reg := targets.NewRegistry(in.cli, o.EtcdPrefix)
	reg.GroupClaims(max(o.ClaimsInFlight, 0))
	w := targets.NewWatcher(in.cli, reg.Prefix(), o.Log)
	in.Service = NewService(reg, w, cfg)
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	in.cancel = cancel
	in.wg.Add(5)
	go func() { defer in.wg.Done(); w.Run(runCtx) }()
	go func() { defer in.wg.Done(); in.Service.RunJanitor(runCtx, in.cli, o.ID) }()
	go func() { defer in.wg.Done(); in.Service.runExtensions(runCtx, in.Service.cfg.Janitor.ExtendInterval) }()
	go func() { defer in.wg.Done(); in.Service.runCopyRequests(runCtx, in.Service.cfg.Janitor.CopyInterval) }()
	go func() { defer in.wg.Done(); in.Service.runFleetClock(runCtx) }()
	select {
	case <-w.Ready():
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for the first snapshot from etcd %v: %w", endpoints, ctx.Err())
	}
}

// serveGRPC binds the gRPC listeners and serves Placement, Admin, health and reflection on them,
// with mutual TLS and the authorization policy unless Insecure.
func (in *Instance) serveGRPC(o Options) error {
	m := in.Service.Metrics()
	unary := []grpc.UnaryServerInterceptor{m.unary}
	stream := []grpc.StreamServerInterceptor{m.stream}
	opts := []grpc.ServerOption{grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true})}
	if o.Insecure {
		o.Log.Warn("serving gRPC in plaintext with no authentication or authorization (--insecure): anyone who reaches the port can administer Detour")
		opts = append(opts, grpc.Creds(insecure.NewCredentials()))
	} else {
		if o.TLS.Cert == "" || o.TLS.Key == "" || o.TLS.CA == "" {
			return errors.New("mutual TLS needs a server certificate, its key and the client CA (--tls-cert, --tls-key, --client-ca), or --insecure")
		}
		creds, err := pki.ServerCredentials(o.TLS)
		if err != nil {
			return fmt.Errorf("TLS: %w", err)
		}
		creds.OnHandshakeError = func(err error) {
			m.rejections.WithLabelValues("tls_handshake").Inc()
			o.Log.Debug("TLS handshake failed", "err", err)
		}
		in.closers = append(in.closers, creds.Close)
		policy, closePolicy, err := newAuthorizer(o.AuthzPolicyFile, o.AuthzRefresh)
		if err != nil {
			return err
		}
		in.closers = append(in.closers, closePolicy)
		a := &authn{policy: policy, metrics: m, log: o.Log}
		unary, stream = append(unary, a.unary), append(stream, a.stream)
		opts = append(opts, grpc.Creds(creds))
	}
	opts = append(opts, grpc.ChainUnaryInterceptor(unary...), grpc.ChainStreamInterceptor(stream...))
	in.Service.claims = &claimLimiter{rate: rate.Limit(o.ClaimRate), burst: o.ClaimBurst}
	in.health = health.NewServer()
	in.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)

	var err error
	if in.lis, err = net.Listen("tcp", o.Listen); err != nil {
		return fmt.Errorf("listen %s: %w", o.Listen, err)
	}
	in.grpc = grpc.NewServer(opts...)
	pb.RegisterPlacementServiceServer(in.grpc, in.Service)
	healthpb.RegisterHealthServer(in.grpc, in.health)
	admin := in.grpc
	if o.AdminListen != "" {
		if in.alis, err = net.Listen("tcp", o.AdminListen); err != nil {
			in.lis.Close()
			return fmt.Errorf("listen %s: %w", o.AdminListen, err)
		}
		in.adminGRPC = grpc.NewServer(opts...)
		healthpb.RegisterHealthServer(in.adminGRPC, in.health)
		admin = in.adminGRPC
	}
	pb.RegisterAdminServiceServer(admin, in.Service)
	reflection.Register(admin)
	go func() { in.serveErr <- in.grpc.Serve(in.lis) }()
	if in.adminGRPC != nil {
		go func() { in.serveErr <- in.adminGRPC.Serve(in.alis) }()
	}
	return nil
}

// serveMetrics serves /metrics when a metrics address is configured.
func (in *Instance) serveMetrics(o Options) error {
	if o.MetricsListen == "" {
		return nil
	}
	var err error
	if in.mlis, err = net.Listen("tcp", o.MetricsListen); err != nil {
		return fmt.Errorf("listen %s: %w", o.MetricsListen, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(in.Service.Metrics().Registry, promhttp.HandlerOpts{}))
	in.metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { in.serveErr <- in.metrics.Serve(in.mlis) }()
	return nil
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
	for _, srv := range []*grpc.Server{in.grpc, in.adminGRPC} {
		if srv == nil {
			continue
		}
		done := make(chan struct{})
		go func() { srv.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-ctx.Done():
			srv.Stop()
			<-done
		}
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
	for _, c := range in.closers {
		c()
	}
	in.closers = nil
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
