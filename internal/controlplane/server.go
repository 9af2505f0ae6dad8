package controlplane

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
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

// ErrServerClosed is what Serve returns after Shutdown.
var ErrServerClosed = errors.New("controlplane: server closed")

// LivenessService is the gRPC health service name that is SERVING for as long as the process
// serves, loading or not: liveness and startup probes ask for it, so that no size of snapshot gets
// a replica killed while it loads. The overall status ("") is SERVING only once the snapshot is
// loaded: readiness.
const LivenessService = "liveness"

// DefaultCheckpointInterval is how often a replica rewrites its checkpoint while serving.
const DefaultCheckpointInterval = 2 * time.Minute

// DefaultEtcdCopyMaxBytes is the largest etcd database a load reads as a copy by default: the
// embedded etcd's largest quota.
const DefaultEtcdCopyMaxBytes = 8 << 30

// Options are everything a control-plane replica is built from. Zero fields take defaults.
type Options struct {
	Listen          string   // gRPC address Listen binds (default 127.0.0.1:7700)
	MetricsListen   string   // Prometheus /metrics address Listen binds; empty: none
	EtcdEndpoints   []string // empty: start an embedded etcd in DataDir
	EtcdPrefix      string   // default targets.DefaultPrefix
	DataDir         string   // embedded etcd data (default ./detour-data)
	EmbeddedEtcdURL string   // embedded etcd client URL, https:// (default: a free loopback port)
	// EmbeddedEtcdQuota is the embedded etcd's backend space quota (default
	// etcdembed.DefaultQuotaBytes, 2 GiB).
	EmbeddedEtcdQuota int64
	// EtcdCopyMaxBytes bounds the etcd database a load reads as a copy (Maintenance.Snapshot,
	// written beside the checkpoint, else in DataDir, and removed once read) rather than by range:
	// a sequential read for etcd instead of a random lookup per record. 0: DefaultEtcdCopyMaxBytes;
	// negative: loads read by range. External etcd only: the embedded member is read in process.
	EtcdCopyMaxBytes int64
	// RecordEncoding is how object records are written: "home-ref" (records name a shared home
	// record), "compact" or "proto" (targets.ParseRecordEncoding). Empty: home-ref with the
	// embedded etcd, which no other replica shares, and compact with an external one, where
	// replicas of a release that cannot read home records may still run (docs/deploy.md, "Upgrade
	// order"): a release reads a format before any release writes it by default.
	RecordEncoding string
	// Checkpoint is a file the replica writes its object index to (every CheckpointInterval and
	// when it stops) and starts from: the records are then read from it, not one by one from
	// etcd, and only etcd's history since it is replayed (targets.Watcher.Checkpoint). Empty: none.
	Checkpoint string
	// CheckpointInterval is how often the checkpoint is rewritten while serving (default 2m,
	// within the janitor's compaction interval so that a crash leaves one etcd can still follow
	// from; negative: only when the replica stops).
	CheckpointInterval time.Duration
	// NoEarlyWalk turns off, with the embedded etcd, the walk of its database file at a start that
	// has no clean stop to serve: such a start copies the file before etcd opens it, walks the copy
	// while etcd restarts (seconds at a million records) and serves redirects from it meanwhile,
	// then replays etcd's history since (targets.Watcher.ServeMemberCopy). With NoEarlyWalk such a
	// start serves nothing until etcd is up.
	NoEarlyWalk bool
	// GCPercent is the collector's target (as GOGC) once a snapshot is first served (a
	// provisional one included: a clean stop's, or a walk of the embedded etcd's file); 0 leaves
	// the runtime's (GOGC, or 100). A load before that runs at the runtime's: a lower target there
	// slows it. (The embedded etcd's own restart measured the same at GOGC 100, 200, 400 and off.)
	GCPercent int
	Region    string
	Signer    *blob.Signer
	// GCSEndpoint is a GCS-API endpoint (an emulator); empty: Google Cloud Storage with the
	// standard Google credentials. The control plane verifies fills, probes targets and deletes
	// retired objects through it; without store access it grants no fills and redirects nothing.
	GCSEndpoint string
	// StoreEvents is where the targets' bucket change notifications are pulled from.
	StoreEvents StoreEventsConfig
	// VerifyFullFraction is the share of fills re-read and re-hashed before READY (0..1).
	VerifyFullFraction float64
	Janitor            JanitorConfig
	// ID names this replica in the janitor election (default host:pid:listen address).
	ID           string
	WriteTimeout time.Duration // bound on each etcd write an RPC makes (default 5s)
	ClaimTimeout time.Duration // bound on a fill claim's write (default 1s; see Config.ClaimTimeout)
	// RedirectCacheMaxAge bounds how long agents reuse a redirect without asking (default 1m;
	// negative: they do not cache redirects).
	RedirectCacheMaxAge time.Duration
	// AgentLagThreshold is how long an agent's applied target set may be behind before it is
	// flagged lagging (default 30s).
	AgentLagThreshold time.Duration
	// Etcd configures compaction and the reading of etcd's alarms; with the embedded etcd the
	// janitor also defragments it and recovers it from NOSPACE (Defrag is set).
	Etcd EtcdMaintenance
	// Now is the clock of expiries, placement and the janitor (default time.Now): tests move it
	// forward to see objects expire.
	Now func() time.Time

	// TLS is the server's certificate and key and the CA that client certificates must chain to
	// (mutual TLS: every RPC but health checks needs a client certificate). Required unless
	// Insecure; the files are re-read when they change.
	TLS      pki.Files
	Insecure bool // plaintext, no authentication or authorization (development only)
	// AuthzPolicyFile is a gRPC authorization policy (JSON), re-read every AuthzRefresh (default
	// 10s); empty: DefaultAuthzPolicy.
	AuthzPolicyFile string
	AuthzRefresh    time.Duration
	// AdminListen, if set, is the address Listen binds for AdminService (and reflection) on its
	// own, so operators can firewall it apart from the agents' PlacementService on Listen.
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

	// etcdStarting, in tests, runs before an embedded etcd starts in the background (after a
	// clean stop, or with a copy of its file to serve): it holds the start back to show what is
	// served meanwhile, until ctx (the start's) ends.
	etcdStarting func(ctx context.Context)
	// memberCopied, in tests, runs once a start has copied the embedded etcd's database file (the
	// copy's path), before anything reads the copy.
	memberCopied func(path string)
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
	if o.CheckpointInterval == 0 {
		o.CheckpointInterval = DefaultCheckpointInterval
	}
	if o.EtcdCopyMaxBytes == 0 {
		o.EtcdCopyMaxBytes = DefaultEtcdCopyMaxBytes
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

// Listeners are what a Server serves on.
type Listeners struct {
	// Placement serves PlacementService and health, and AdminService and reflection too unless
	// Admin is set. Required.
	Placement net.Listener
	// Admin, if set, serves AdminService, reflection and health on its own.
	Admin net.Listener
	// Metrics, if set, serves Prometheus /metrics.
	Metrics net.Listener
}

// Close closes every listener.
func (ls Listeners) Close() {
	for _, l := range []net.Listener{ls.Placement, ls.Admin, ls.Metrics} {
		if l != nil {
			l.Close()
		}
	}
}

// Server is one control-plane replica, shaped like net/http's Server: New builds it (etcd client
// or embedded etcd, store client, registry, watcher, services, janitor) without serving; Serve
// serves the listeners and runs every background loop (the snapshot watcher, the janitor's
// campaign and terms, the loops every replica runs) under one errgroup until Shutdown or a fatal
// error; Shutdown drains and stops them all. No goroutine it starts outlives Shutdown.
//
// Serving starts before the first snapshot is loaded, whatever its size: meanwhile health says
// NOT_SERVING, Place answers INLINE with reason "loading", the Admin API and the Placement calls
// that read the snapshot answer Unavailable, and the log shows the load's progress. Ready is closed
// when the snapshot is loaded.
type Server struct {
	o    Options
	etcd *etcdembed.Server // nil with external etcd
	cli  *clientv3.Client
	// etcdConfig is cli's configuration, from which the clients of single members are made
	// (alarms.go).
	etcdConfig clientv3.Config
	store      *blob.Store // nil without store access
	w          *targets.Watcher
	svc        *Service
	janitor    *Janitor
	health     *health.Server
	opts       []grpc.ServerOption
	closers    []func() // certificate and policy watchers

	mu       sync.Mutex
	serving  bool
	closed   bool
	servers  []*grpc.Server
	metrics  *http.Server
	cancel   context.CancelFunc // ends Serve's errgroup
	served   chan struct{}      // closed when Serve returns
	shutdown chan struct{}      // closed when Shutdown has released everything
	ready    chan struct{}      // closed once the snapshot is loaded and health says SERVING

	// An embedded etcd started in the background (a start that serves a clean stop's checkpoint,
	// or a walk of etcd's database file, meanwhile): etcdUp is closed once it serves or failed (etcdErr), and etcd
	// is set before. Closed at New otherwise.
	etcdUp     chan struct{}
	etcdErr    error
	etcdCancel context.CancelFunc
	early      bool // the clean stop's checkpoint, or memberCopy, is served while the embedded etcd starts
	// memberCopy is a copy of the embedded etcd's database file, taken before it started, that is
	// walked and served while it restarts (no clean stop to serve): see copyMemberDatabase.
	memberCopy string
	gcOnce     sync.Once // servingGC
	// cleanEtcdRev is etcd's revision the clean stop recorded; etcdMoved says the embedded etcd
	// came back at another (set before etcdUp is closed).
	cleanEtcdRev int64
	etcdMoved    bool
	// markedRev is etcd's revision the marker written at this stop holds (0: none written).
	markedRev int64
}

// New builds a replica from o: it connects to etcd (starting an embedded one when o names no
// endpoints), builds the store client, the registry and its watcher, the gRPC services and the
// janitor, and checks the TLS and authorization settings. It serves nothing and starts no loop;
// ctx bounds only the building. Call Serve to serve, Shutdown to release what New holds.
func New(ctx context.Context, o Options) (srv *Server, err error) {
	o.setDefaults()
	if err := o.StoreEvents.Validate(); err != nil {
		return nil, err
	}
	s := &Server{o: o, served: make(chan struct{}), shutdown: make(chan struct{}), ready: make(chan struct{}), etcdUp: make(chan struct{})}
	defer func() {
		if err != nil {
			s.closeBackends(context.Background())
		}
	}()
	var pre *targets.Preloaded
	if len(o.EtcdEndpoints) == 0 {
		// Every start with the embedded etcd takes its clean-stop marker before that etcd starts,
		// whatever it does with it: once etcd runs, a marker would no longer be true.
		clean, err := targets.TakeCleanStop(s.cleanStopPath())
		switch {
		case errors.Is(err, targets.ErrCheckpointDamaged):
			o.Log.Warn("clean-stop marker damaged, removed", "path", s.cleanStopPath(), "err", err)
		case err != nil:
			return nil, fmt.Errorf("clean-stop marker %s: %w; the embedded etcd does not start while it may be there (remove it by hand)", s.cleanStopPath(), err)
		case clean != nil && o.Checkpoint != "":
			// Only the replica's own embedded etcd is known unchanged since the stop.
			pre = targets.Preload(o.Checkpoint)
			pre.UseCleanStop(clean)
			s.early, s.cleanEtcdRev = true, clean.EtcdRevision()
		}
		if !s.early && !o.NoEarlyWalk {
			s.copyMemberDatabase()
		} else {
			_ = os.Remove(s.memberCopyPath()) // an earlier start's, killed before it walked it
		}
	}
	if pre == nil && o.Checkpoint != "" && s.memberCopy == "" {
		// The checkpoint is decoded while an embedded etcd starts (its restart takes seconds at a
		// million records).
		pre = targets.Preload(o.Checkpoint)
	}
	endpoints, err := s.connectEtcd(ctx)
	if err != nil {
		return nil, err
	}
	cfg := Config{Log: o.Log, Signer: o.Signer, WriteTimeout: o.WriteTimeout, ClaimTimeout: o.ClaimTimeout,
		RedirectCacheMaxAge: o.RedirectCacheMaxAge, AgentLagThreshold: o.AgentLagThreshold,
		VerifyFullFraction: o.VerifyFullFraction, Janitor: o.Janitor, StoreEvents: o.StoreEvents, Etcd: o.Etcd, Now: o.Now}
	embedded := len(o.EtcdEndpoints) == 0
	if embedded {
		cfg.Etcd.Defrag = true // one member, ours: defragmenting it is safe and nobody else will
		cfg.Etcd.InProcess = true
	}
	if s.store, err = blob.NewStore(ctx, blob.Options{Endpoint: o.GCSEndpoint}); err != nil {
		o.Log.Error("no access to the stores: no fills will be granted and no target becomes healthy (nothing is redirected)", "err", err)
		s.store = nil
	} else {
		cfg.Store = s.store
	}
	enc, err := recordEncoding(o.RecordEncoding, embedded)
	if err != nil {
		return nil, err
	}
	reg := targets.NewRegistry(s.cli, o.EtcdPrefix)
	reg.SetRecordEncoding(enc)
	o.Log.Info("object records written in the "+enc.String()+" encoding", "record_encoding", enc.String())
	reg.GroupClaims(max(o.ClaimsInFlight, 0))
	s.w = targets.NewWatcher(s.cli, reg.Prefix(), o.Log)
	if embedded {
		// The embedded etcd is a single member in this process: loads read it in process (once
		// it is up: loads begin after that).
		s.w.ReadLocally(func(ctx context.Context, key, end string, rev, limit int64) ([]*mvccpb.KeyValue, bool, error) {
			e, err := s.embeddedEtcd(ctx)
			if err != nil {
				return nil, false, err
			}
			return e.Range(ctx, key, end, rev, limit)
		})
	}
	if o.EtcdCopyMaxBytes > 0 && !embedded {
		// (The embedded member is read in process, which measured faster than a copy at 1e6.) The
		// copy goes beside the checkpoint, the replica's writable state, else in the data directory.
		dir := o.DataDir
		if o.Checkpoint != "" {
			dir = filepath.Dir(o.Checkpoint)
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			o.Log.Warn("no loads from copies of etcd's database: their directory cannot be made; loads read by range", "path", dir, "err", err)
		} else {
			s.w.LoadFromDatabaseCopies(dir, o.EtcdCopyMaxBytes)
		}
	}
	if o.Checkpoint != "" {
		if err := os.MkdirAll(filepath.Dir(o.Checkpoint), 0o700); err != nil {
			o.Log.Warn("no checkpoint: its directory cannot be made; every start reads every record from etcd", "path", o.Checkpoint, "err", err)
		} else if pre != nil {
			s.w.WithPreloaded(pre)
		} else {
			s.w.Checkpoint(o.Checkpoint)
		}
	}
	d := newDeps(reg, s.w, cfg)
	s.svc = newService(d)
	d.etcd.members.reach(s.etcdConfig)
	s.svc.claims = &claimLimiter{rate: rate.Limit(o.ClaimRate), burst: o.ClaimBurst}
	s.janitor = newJanitor(d, s.cli, o.ID)
	s.health = health.NewServer()
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	s.health.SetServingStatus(LivenessService, healthpb.HealthCheckResponse_SERVING)
	if s.opts, err = s.serverOptions(); err != nil {
		return nil, err
	}
	o.Log.Info("control plane built", "region", o.Region, "etcd", endpoints, "prefix", reg.Prefix(), "id", o.ID)
	return s, nil
}

// connectEtcd builds the etcd client, starting an embedded etcd when no endpoints are given: in
// the background when the replica serves a clean stop's checkpoint or a walk of etcd's database
// file meanwhile (s.early), else before it returns.
func (s *Server) connectEtcd(ctx context.Context) ([]string, error) {
	o := s.o
	endpoints := o.EtcdEndpoints
	if len(endpoints) == 0 {
		dir := filepath.Join(o.DataDir, "etcd")
		ecfg := etcdembed.Config{Dir: dir, ClientURL: o.EmbeddedEtcdURL, QuotaBytes: o.EmbeddedEtcdQuota}
		started := func(e *etcdembed.Server, began time.Time) {
			o.Log.Info("embedded etcd started (mutual TLS; etcdctl takes --cacert, --cert and --key from etcd_pki)", "dir", dir,
				"endpoint", e.Endpoint(), "etcd_pki", e.PKI().Dir, "quota_bytes", e.QuotaBytes(), "took", time.Since(began).Round(time.Millisecond).String())
		}
		began := time.Now()
		if !s.early {
			var err error
			if s.etcd, err = etcdembed.Start(ctx, ecfg); err != nil {
				return nil, err
			}
			close(s.etcdUp)
			started(s.etcd, began)
			endpoints = []string{s.etcd.Endpoint()}
			// The embedded etcd accepts only its own CA's certificates (mutual TLS): this is ours.
			o.EtcdTLS = s.etcd.PKI().Client
		} else {
			// The ports are picked before the start (no second try on others), for the client.
			var p etcdembed.PKI
			var err error
			if ecfg, p, err = etcdembed.Prepare(ecfg); err != nil {
				return nil, err
			}
			endpoints, o.EtcdTLS = []string{ecfg.ClientURL}, p.Client
			if s.memberCopy != "" {
				o.Log.Info("embedded etcd starting in the background; serving the index in its database file meanwhile", "dir", dir)
			} else {
				o.Log.Info("embedded etcd starting in the background; serving the last clean stop's index meanwhile", "dir", dir)
			}
			var sctx context.Context
			sctx, s.etcdCancel = context.WithCancel(context.Background())
			go func() {
				defer close(s.etcdUp)
				if o.etcdStarting != nil {
					o.etcdStarting(sctx)
				}
				if s.etcd, s.etcdErr = etcdembed.Start(sctx, ecfg); s.etcdErr != nil {
					return
				}
				started(s.etcd, began)
				// Before anything of this process can write to it: is it what the stop left? (A
				// copy of its file is checked by the watcher's resume from it.)
				if rev := s.etcd.Revision(); s.memberCopy == "" && rev != s.cleanEtcdRev {
					s.etcdMoved = true
					o.Log.Warn("the embedded etcd is not at the revision of the clean stop", "revision", rev, "clean_stop_revision", s.cleanEtcdRev)
				}
			}()
		}
	} else {
		close(s.etcdUp)
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
	s.etcdConfig = cfg
	var err error
	if s.cli, err = clientv3.New(cfg); err != nil {
		return nil, fmt.Errorf("etcd client for %v: %w", endpoints, err)
	}
	return endpoints, nil
}

// serverOptions are the gRPC servers' options: metrics, mutual TLS and the authorization policy
// unless Insecure, and the gate that holds back what needs the snapshot while it loads.
func (s *Server) serverOptions() ([]grpc.ServerOption, error) {
	o, m := s.o, s.svc.Metrics()
	unary := []grpc.UnaryServerInterceptor{m.unary}
	stream := []grpc.StreamServerInterceptor{m.stream}
	opts := []grpc.ServerOption{grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true})}
	if o.Insecure {
		o.Log.Warn("serving gRPC in plaintext with no authentication or authorization (--insecure): anyone who reaches the port can administer Detour")
		opts = append(opts, grpc.Creds(insecure.NewCredentials()))
	} else {
		if o.TLS.Cert == "" || o.TLS.Key == "" || o.TLS.CA == "" {
			return nil, errors.New("mutual TLS needs a server certificate, its key and the client CA (--tls-cert, --tls-key, --client-ca), or --insecure")
		}
		creds, err := pki.ServerCredentials(o.TLS)
		if err != nil {
			return nil, fmt.Errorf("TLS: %w", err)
		}
		creds.OnHandshakeError = func(err error) {
			m.rejections.WithLabelValues("tls_handshake").Inc()
			o.Log.Debug("TLS handshake failed", "err", err)
		}
		s.closers = append(s.closers, creds.Close)
		policy, closePolicy, err := newAuthorizer(o.AuthzPolicyFile, o.AuthzRefresh)
		if err != nil {
			return nil, err
		}
		s.closers = append(s.closers, closePolicy)
		a := &authn{policy: policy, metrics: m, log: o.Log}
		unary, stream = append(unary, a.unary), append(stream, a.stream)
		opts = append(opts, grpc.Creds(creds))
	}
	unary, stream = append(unary, s.svc.gateUnary), append(stream, s.svc.gateStream)
	return append(opts, grpc.ChainUnaryInterceptor(unary...), grpc.ChainStreamInterceptor(stream...)), nil
}

// Listen binds the addresses of the options: Listen, and AdminListen and MetricsListen when set.
func (s *Server) Listen() (Listeners, error) {
	var ls Listeners
	var err error
	if ls.Placement, err = net.Listen("tcp", s.o.Listen); err != nil {
		return ls, fmt.Errorf("listen %s: %w", s.o.Listen, err)
	}
	for _, l := range []struct {
		addr string
		to   *net.Listener
	}{{s.o.AdminListen, &ls.Admin}, {s.o.MetricsListen, &ls.Metrics}} {
		if l.addr == "" {
			continue
		}
		if *l.to, err = net.Listen("tcp", l.addr); err != nil {
			ls.Close()
			return Listeners{}, fmt.Errorf("listen %s: %w", l.addr, err)
		}
	}
	return ls, nil
}

// ListenAndServe binds the options' addresses (see Listen) and serves them (see Serve).
func (s *Server) ListenAndServe() error {
	ls, err := s.Listen()
	if err != nil {
		return err
	}
	return s.Serve(ls)
}

// Serve serves the gRPC services and metrics on ls and runs every background loop, and blocks
// until Shutdown is called (it then returns ErrServerClosed) or something fails for good: a
// listener, in which case it stops the rest and returns that error. Either way, Shutdown then
// releases etcd and the store. Serve closes ls. It may be called once.
func (s *Server) Serve(ls Listeners) error {
	if ls.Placement == nil {
		ls.Close()
		return errors.New("controlplane: Serve needs a placement listener")
	}
	s.mu.Lock()
	switch {
	case s.closed:
		s.mu.Unlock()
		ls.Close()
		return ErrServerClosed
	case s.serving:
		s.mu.Unlock()
		ls.Close()
		return errors.New("controlplane: Serve called twice")
	}
	s.serving = true
	defer close(s.served)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s.cancel = cancel
	placement, admin := s.grpcServers(ls.Admin != nil)
	s.servers = []*grpc.Server{placement}
	if admin != placement {
		s.servers = append(s.servers, admin)
	}
	if ls.Metrics != nil {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(s.svc.Metrics().Registry, promhttp.HandlerOpts{}))
		s.metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	}
	s.mu.Unlock()

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		switch {
		case s.memberCopy != "":
			if s.w.ServeMemberCopy(gctx, s.memberCopy) {
				// The walk's garbage goes back now, and the collector runs at its serving target
				// from here: etcd's restore beside it and the store guard's listings after it
				// would otherwise grow the heap to twice what is live.
				releaseMemory(s.o.Log, "etcd's database file walked")
				s.servingGC()
			}
		case s.early:
			if s.w.ServeCleanStop(gctx) {
				s.servingGC()
			}
		}
		return s.afterEtcd(gctx, func(ctx context.Context) error {
			if s.etcdMoved {
				s.w.DropProvisional("the embedded etcd came back at another revision than the clean stop's")
			}
			return s.w.Run(ctx)
		})
	})
	g.Go(func() error { s.reportLoad(gctx, ls); return nil })
	g.Go(func() error { return s.afterEtcd(gctx, s.svc.Run) })
	g.Go(func() error {
		return s.afterEtcd(gctx, func(ctx context.Context) error { s.svc.runEtcdStatus(ctx, s.cli); return nil })
	})
	g.Go(func() error { return s.afterEtcd(gctx, s.janitor.Run) })
	g.Go(func() error { s.w.RunCheckpoints(gctx, s.o.CheckpointInterval); return nil })
	g.Go(func() error { return serveGRPC("placement", placement, ls.Placement) })
	if admin != placement {
		g.Go(func() error { return serveGRPC("admin", admin, ls.Admin) })
	}
	if s.metrics != nil {
		g.Go(func() error {
			if err := s.metrics.Serve(ls.Metrics); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("serve metrics on %s: %w", ls.Metrics.Addr(), err)
			}
			return nil
		})
	}
	// The servers stop when the group does: at once after a failure, after a graceful stop on
	// Shutdown (where Stop finds nothing left).
	g.Go(func() error {
		<-gctx.Done()
		for _, srv := range s.servers {
			srv.Stop()
		}
		if s.metrics != nil {
			s.metrics.Close()
		}
		return nil
	})
	err := g.Wait()
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	// The watcher has stopped: the last snapshot is the replica's last word on the index, and
	// the next start resumes from it.
	began := time.Now()
	if rev, cerr := s.w.WriteCheckpoint(); cerr != nil {
		s.o.Log.Warn("cannot write the checkpoint; the next start reads every record from etcd", "err", cerr)
	} else {
		if rev != 0 {
			s.o.Log.Info("checkpoint written", "path", s.o.Checkpoint, "revision", rev, "objects", s.w.Snapshot().ObjectCount(),
				"took", time.Since(began).Round(time.Millisecond).String())
		}
		s.markCleanStop()
	}
	if closed || err == nil {
		return ErrServerClosed
	}
	s.o.Log.Error("control plane failed; stopping", "err", err)
	return err
}

// markCleanStop marks the checkpoint just written as what the embedded etcd holds, so that the next
// start serves it while that etcd restarts (targets.WriteCleanStop says when it refuses).
func (s *Server) markCleanStop() {
	if s.o.Checkpoint == "" || len(s.o.EtcdEndpoints) != 0 {
		return
	}
	select {
	case <-s.w.Ready(): // etcd was up: the snapshot was read from it
	default:
		return // stopped before the load was done: no checkpoint of this run
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rev, err := s.w.WriteCleanStop(ctx, s.cleanStopPath())
	if err != nil {
		next := "the next start serves a walk of its etcd's database file while that etcd restarts"
		if s.o.NoEarlyWalk {
			next = "the next start serves nothing until its etcd is up"
		}
		s.o.Log.Info("stop not marked clean: "+next, "reason", err)
		return
	}
	s.markedRev = rev
	s.o.Log.Info("stop marked clean: the next start serves this checkpoint while its etcd restarts", "path", s.cleanStopPath(), "etcd_revision", rev)
}

// servingGC sets the collector's target for serving (--gc-percent), once: when a snapshot is first
// served, provisional or not.
func (s *Server) servingGC() {
	s.gcOnce.Do(func() {
		if s.o.GCPercent > 0 {
			was := debug.SetGCPercent(s.o.GCPercent)
			s.o.Log.Info("collector target for serving set (--gc-percent)", "gc_percent", s.o.GCPercent, "was", was)
		}
	})
}

// copyMemberDatabase copies the embedded etcd's database file before that etcd starts, for Serve to
// walk and serve while it restarts (targets.Watcher.ServeMemberCopy): a start that has no clean
// stop to serve then redirects seconds before its etcd is up. Nothing to copy (a first start) or a
// copy that fails (logged) leaves the start serving nothing until etcd is up, as without the walk.
func (s *Server) copyMemberDatabase() {
	src, dst := filepath.Join(s.o.DataDir, "etcd", "member", "snap", "db"), s.memberCopyPath()
	began := time.Now()
	n, err := targets.CopyMemberDatabase(src, dst)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return
	case err != nil:
		s.o.Log.Warn("no copy of the embedded etcd's database at start: nothing is served until etcd is up", "err", err)
		return
	}
	s.memberCopy, s.early = dst, true
	if s.o.memberCopied != nil {
		s.o.memberCopied(dst)
	}
	s.o.Log.Info("copied the embedded etcd's database before it starts, to serve from while it restarts", "path", dst, "bytes", n,
		"took", time.Since(began).Round(time.Millisecond).String())
}

// memberCopyPath is where a start copies the embedded etcd's database file to walk it.
func (s *Server) memberCopyPath() string { return filepath.Join(s.o.DataDir, "etcd-db.start-copy") }

// cleanStopPath is where the embedded etcd's clean-stop marker is: with its data, so that every
// start with that etcd finds it, whatever its checkpoint settings.
func (s *Server) cleanStopPath() string { return filepath.Join(s.o.DataDir, "etcd.clean-stop") }

// grpcServers builds the gRPC servers: one for everything, or, with an admin listener of its
// own, one for PlacementService and one for AdminService and reflection (both serve health).
func (s *Server) grpcServers(separateAdmin bool) (placement, admin *grpc.Server) {
	placement = grpc.NewServer(s.opts...)
	pb.RegisterPlacementServiceServer(placement, s.svc)
	healthpb.RegisterHealthServer(placement, s.health)
	admin = placement
	if separateAdmin {
		admin = grpc.NewServer(s.opts...)
		healthpb.RegisterHealthServer(admin, s.health)
	}
	pb.RegisterAdminServiceServer(admin, s.svc)
	reflection.Register(admin)
	return placement, admin
}

func serveGRPC(name string, srv *grpc.Server, lis net.Listener) error {
	if err := srv.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serve %s gRPC on %s: %w", name, lis.Addr(), err)
	}
	return nil
}

// loadReportInterval is how often the log shows the first load's progress.
const loadReportInterval = 5 * time.Second

// loadProgressArgs are the attributes of a load's progress line: n of the expected records read
// in the elapsed time of the current load, the rate so far and, once there is one, when the load
// should end at that rate.
func loadProgressArgs(n, expected int64, elapsed time.Duration) []any {
	args := []any{"records", n, "expected", expected, "elapsed", elapsed.Round(time.Second).String()}
	if n > 0 && elapsed > 0 {
		rate := float64(n) / elapsed.Seconds()
		args = append(args, "rate_per_second", int64(rate))
		if expected > n {
			args = append(args, "expected_end_in", time.Duration(float64(expected-n)/rate*float64(time.Second)).Round(time.Second).String())
		}
	}
	return args
}

// reportLoad logs the first snapshot load's progress until it is done, then says the replica is
// serving and turns health to SERVING.
func (s *Server) reportLoad(ctx context.Context, ls Listeners) {
	start := time.Now()
	t := time.NewTicker(loadReportInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			// The rate is the current load's: one that failed and began again counts from zero.
			elapsed, began := time.Since(start), s.w.LoadBegan()
			if !began.IsZero() {
				elapsed = time.Since(began)
			}
			msg := "loading the snapshot; placement answers inline meanwhile"
			if s.w.Snapshot().Provisional() {
				msg = "loading the snapshot; placement redirects from the provisional index (a clean stop's, or etcd's database file's) meanwhile"
			}
			s.o.Log.Info(msg, append(loadProgressArgs(s.w.LoadProgress(), s.w.LoadExpected(), elapsed), "since_start", time.Since(start).Round(time.Second).String())...)
		case <-s.w.Ready():
			snap := s.w.Snapshot()
			s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
			close(s.ready)
			args := []any{"grpc", ls.Placement.Addr().String(), "region", s.o.Region, "revision", snap.Revision,
				"objects", snap.ObjectCount(), "targets", len(snap.Targets()), "loaded_in", time.Since(start).Round(time.Millisecond).String()}
			if ls.Admin != nil {
				args = append(args, "admin", ls.Admin.Addr().String())
			}
			if ls.Metrics != nil {
				args = append(args, "metrics", ls.Metrics.Addr().String())
			}
			s.o.Log.Info("control plane serving", args...)
			releaseMemory(s.o.Log, "first snapshot loaded")
			s.servingGC()
			return
		}
	}
}

// Shutdown stops the replica: health turns NOT_SERVING, the listeners close, WatchTargets
// streams end (agents reconnect elsewhere) and in-flight RPCs may finish until ctx ends, when
// they are cut; then every background loop stops and etcd (an embedded one too), the store
// client and the certificate watchers are released. It returns once nothing it started is
// running: nil, or ctx's error when it had to cut things short. After Shutdown, Serve returns
// ErrServerClosed. Calls after the first wait for it and return nil.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		<-s.shutdown
		return nil
	}
	s.closed = true
	serving, servers, metrics, cancel := s.serving, s.servers, s.metrics, s.cancel
	s.mu.Unlock()
	defer close(s.shutdown)
	s.health.Shutdown()
	close(s.svc.stopping)

	cut := false
	if serving {
		stopped := make(chan struct{})
		go func() {
			var wg sync.WaitGroup
			for _, srv := range servers {
				wg.Go(srv.GracefulStop)
			}
			wg.Wait()
			close(stopped)
		}()
		select {
		case <-stopped:
		case <-ctx.Done():
			cut = true
			for _, srv := range servers {
				srv.Stop()
			}
			<-stopped
		}
		if metrics != nil {
			if err := metrics.Shutdown(ctx); err != nil {
				cut = true
				metrics.Close()
			}
		}
		cancel()
		select {
		case <-s.served:
		case <-ctx.Done():
			// A loop still waits on etcd: closing the client ends its calls.
			cut = true
			s.cli.Close()
			<-s.served
		}
	}
	if !s.closeBackends(ctx) {
		cut = true
	}
	s.o.Log.Info("control plane stopped", "cut_short", cut)
	if cut {
		return ctx.Err()
	}
	return nil
}

// closeBackends releases what New made. An embedded etcd still starting in the background (its
// restore takes no context) is waited for until ctx ends, then closed by a goroutine once it is up;
// false then.
func (s *Server) closeBackends(ctx context.Context) bool {
	if s.memberCopy != "" {
		_ = os.Remove(s.memberCopy) // Serve did not walk it (walking removes it)
	}
	for _, c := range s.closers {
		c()
	}
	s.closers = nil
	if s.store != nil {
		s.store.Close()
	}
	if s.svc != nil {
		s.svc.etcd.members.close()
	}
	if s.cli != nil {
		s.cli.Close()
	}
	if s.etcdCancel != nil {
		s.etcdCancel()
		select {
		case <-s.etcdUp:
		case <-ctx.Done():
			go func() {
				<-s.etcdUp
				if s.etcd != nil {
					s.etcd.Close()
				}
			}()
			return false
		}
	}
	if s.etcd != nil {
		// Nothing of this process writes any more: a marker written at this stop holds only if
		// etcd is still where the stop was checked (another client, a lease expiring, a write that
		// was under way may have moved it since).
		if s.markedRev != 0 {
			if rev := s.etcd.Revision(); rev != s.markedRev {
				if err := os.Remove(s.cleanStopPath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
					s.o.Log.Error("etcd changed after the stop was marked clean and the marker cannot be removed: remove it before the next start",
						"path", s.cleanStopPath(), "err", err)
				} else {
					s.o.Log.Info("etcd changed after the stop was marked clean: marker removed", "revision", rev, "marked", s.markedRev)
				}
			}
		}
		s.etcd.Close()
	}
	return true
}

// waitEtcd waits until etcd can be used: at once with an external etcd (whose outages the loops
// handle themselves), once an embedded one starting in the background is up. false: ctx ended
// first; an error: the embedded etcd failed to start.
func (s *Server) waitEtcd(ctx context.Context) (bool, error) {
	select {
	case <-s.etcdUp:
		return true, s.etcdErr
	case <-ctx.Done():
		return false, ctx.Err()
	}
}

// embeddedEtcd waits for the embedded etcd to be up and returns it.
func (s *Server) embeddedEtcd(ctx context.Context) (*etcdembed.Server, error) {
	if _, err := s.waitEtcd(ctx); err != nil {
		return nil, err
	}
	if s.etcd == nil {
		return nil, errors.New("no embedded etcd")
	}
	return s.etcd, nil
}

// afterEtcd runs fn once etcd can be used (waitEtcd): the loops that read or write etcd wait for
// an embedded one that starts in the background. An embedded etcd that fails to start fails Serve.
func (s *Server) afterEtcd(ctx context.Context, fn func(context.Context) error) error {
	up, err := s.waitEtcd(ctx)
	if !up {
		return nil
	}
	if err != nil {
		return err
	}
	return fn(ctx)
}

// Ready is closed once the first snapshot is loaded (health SERVING from then on).
func (s *Server) Ready() <-chan struct{} { return s.ready }

// Metrics are the replica's metrics.
func (s *Server) Metrics() *Metrics { return s.svc.Metrics() }

// Janitor is the replica's janitor (Sweep and Reconcile run a round at once).
func (s *Server) Janitor() *Janitor { return s.janitor }

// EtcdEndpoint is the embedded etcd's client URL ("" when using external etcd).
func (s *Server) EtcdEndpoint() string {
	if len(s.o.EtcdEndpoints) != 0 {
		return ""
	}
	return s.etcdConfig.Endpoints[0]
}

// EmbeddedEtcd is the embedded etcd member (nil when using external etcd or when it failed to
// start): its ClientConfig reaches it with the client certificate of its PKI. At a start that
// serves a clean stop or a walk of its file it starts in the background: EmbeddedEtcd waits for it.
func (s *Server) EmbeddedEtcd() *etcdembed.Server {
	<-s.etcdUp
	return s.etcd
}

// IndexedObjects is the number of object records in this replica's snapshot.
func (s *Server) IndexedObjects() int { return s.w.Snapshot().ObjectCount() }

// UnverifiedTargets is the number of targets whose records no listing of their bucket has
// confirmed since this replica started (benchmarks; detour_store_unverified_targets).
func (s *Server) UnverifiedTargets() int { return s.svc.guard.unverifiedTargets() }

// recordEncoding is the encoding Options.RecordEncoding names, or the default for the kind of etcd.
func recordEncoding(name string, embedded bool) (targets.RecordEncoding, error) {
	switch {
	case name != "":
		return targets.ParseRecordEncoding(name)
	case embedded:
		return targets.EncodingHomeRef, nil
	}
	return targets.EncodingCompact, nil
}
