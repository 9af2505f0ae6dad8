// Package etcdembed runs an etcd member inside the process: the zero-config default of the control
// plane and the real etcd of tests. It owns the member's lifecycle and its transport security:
// client and peer URLs serve mutual TLS only, with a private CA (see PKI); nothing listens in
// plaintext.
package etcdembed

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/txn"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/detourhq/detour/internal/pki"
)

// DefaultQuotaBytes is the member's backend space quota when Config sets none: etcd's own
// default. Past it etcd raises the NOSPACE alarm and refuses writes until space is reclaimed
// (compaction, defragmentation) and the alarm disarmed.
const DefaultQuotaBytes = 2 << 30

// Config says where the member keeps its data and listens. Empty URLs pick free loopback ports.
type Config struct {
	Dir       string
	Name      string // default "detour"
	ClientURL string // https://host:port (default: a free loopback port)
	PeerURL   string // https://host:port (default: a free loopback port)
	LogLevel  string // default "error"
	// InitialCluster lists every member as name=peerURL,...; empty: this member alone.
	InitialCluster string
	// PKIDir holds the private CA and the certificates the member serves and accepts (default:
	// Dir with "-pki" appended); made if absent (EnsurePKI). The members of one cluster share it.
	PKIDir string
	// QuotaBytes is the backend space quota (default DefaultQuotaBytes).
	QuotaBytes int64
}

// Server is a running member.
type Server struct {
	etcd      *embed.Etcd
	cfg       Config
	pki       PKI
	clientTLS *tls.Config
	close     sync.Once
	status    *statusGuard
}

// statusGuard holds the calls that reach the backend outside raft's apply off a stopping member.
// etcd 3.7.3 answers Status from its backend without waiting for the backend's close (etcd issue
// 22189, fix pending), and Compact commits the backend (ForceCommit) after its raft request the
// same way: such a call in flight while the member stops dereferences a closed database and kills
// the process, which, for an embedded etcd, is the control plane (whose replicas poll Status, and
// whose janitor compacts: CI at 16fe782 crashed in Compact). Defragment rewrites the backend
// likewise. Stopping waits for these calls in flight; later ones are refused as Unavailable.
type statusGuard struct {
	mu       sync.RWMutex
	stopping bool
}

// guardedMethods are the calls statusGuard holds off a stopping member.
var guardedMethods = map[string]bool{
	"/etcdserverpb.Maintenance/Status":     true,
	"/etcdserverpb.Maintenance/Defragment": true,
	"/etcdserverpb.KV/Compact":             true,
}

func (g *statusGuard) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if !guardedMethods[info.FullMethod] {
		return handler(ctx, req)
	}
	g.mu.RLock()
	defer g.mu.RUnlock()
	if g.stopping {
		return nil, status.Error(codes.Unavailable, "etcd member is stopping")
	}
	return handler(ctx, req)
}

func (g *statusGuard) stop() {
	g.mu.Lock()
	g.stopping = true
	g.mu.Unlock()
}

// FreeURL returns an https URL on a loopback port that was free a moment ago.
func FreeURL() (string, error) { return freeURL() }

// freeURL is FreeURL; a test replaces it to take a port between the pick and etcd's bind.
var freeURL = freeLoopbackURL

func freeLoopbackURL() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return "https://" + l.Addr().String(), nil
}

// pickOn says whether a port must be picked for u (empty, or on port 0) and on which host
// ("" for loopback).
func pickOn(u string) (string, bool) {
	if u == "" {
		return "", true
	}
	if p, err := url.Parse(u); err == nil && p.Port() == "0" {
		return p.Hostname(), true
	}
	return "", false
}

// freeURLOn is FreeURL on host, or on loopback when host is "" or itself loopback.
func freeURLOn(host string) (string, error) {
	if host == "" || host == "127.0.0.1" || host == "localhost" {
		return FreeURL()
	}
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return "", err
	}
	defer l.Close()
	return "https://" + l.Addr().String(), nil
}

// withDefaults is cfg with its defaults filled in, or why its URLs cannot be served.
func withDefaults(cfg Config) (Config, error) {
	if cfg.Name == "" {
		cfg.Name = "detour"
	}
	if cfg.LogLevel == "" {
		cfg.LogLevel = "error"
	}
	if cfg.PKIDir == "" {
		cfg.PKIDir = strings.TrimRight(cfg.Dir, "/") + "-pki"
	}
	if cfg.QuotaBytes <= 0 {
		cfg.QuotaBytes = DefaultQuotaBytes
	}
	for _, u := range []struct{ name, url string }{{"client", cfg.ClientURL}, {"peer", cfg.PeerURL}} {
		if u.url != "" && !strings.HasPrefix(u.url, "https://") {
			return cfg, fmt.Errorf("embedded etcd %s URL %q: the embedded etcd serves mutual TLS only; give an https:// URL", u.name, u.url)
		}
	}
	return cfg, nil
}

// Prepare is what a client of the member needs before it starts: cfg with its defaults and the
// free ports it asks for picked (Start binds exactly those, with no second try on others), and
// the member's PKI, made if absent. A process can then build its client and go on while Start
// runs (a restart at millions of keys takes tens of seconds).
func Prepare(cfg Config) (Config, PKI, error) {
	cfg, err := withDefaults(cfg)
	if err != nil {
		return cfg, PKI{}, err
	}
	if _, err := pickPorts(&cfg); err != nil {
		return cfg, PKI{}, err
	}
	p, err := EnsurePKI(cfg.PKIDir, hostsOf(cfg)...)
	return cfg, p, err
}

// pickPorts replaces cfg's URLs that ask for a port (empty, or port 0) with free ones; it
// reports whether it picked any.
func pickPorts(cfg *Config) (bool, error) {
	clientHost, pickClient := pickOn(cfg.ClientURL)
	peerHost, pickPeer := pickOn(cfg.PeerURL)
	var err error
	if pickClient {
		if cfg.ClientURL, err = freeURLOn(clientHost); err != nil {
			return false, err
		}
	}
	if pickPeer {
		if cfg.PeerURL, err = freeURLOn(peerHost); err != nil {
			return false, err
		}
	}
	return pickClient || pickPeer, nil
}

// Start starts a single-member cluster and waits until it serves.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	cfg, err := withDefaults(cfg)
	if err != nil {
		return nil, err
	}
	// Ports this function picks were free a moment before etcd binds them; another process may
	// take one in between, so a start that fails on a picked port is tried again with new ones.
	// A URL on port 0 asks for a free port on its host: one is picked here too, since the member
	// advertises the URL it was given and clients that sync their endpoints from the member list
	// would otherwise dial port 0.
	asked := cfg
	for attempt := 1; ; attempt++ {
		cfg.ClientURL, cfg.PeerURL = asked.ClientURL, asked.PeerURL
		picked, err := pickPorts(&cfg)
		if err != nil {
			return nil, err
		}
		s, err := start(ctx, cfg)
		if err != nil && picked && addrInUse(err) && attempt < 5 {
			continue
		}
		return s, err
	}
}

func start(ctx context.Context, cfg Config) (*Server, error) {
	if err := ctx.Err(); err != nil {
		return nil, err // etcd's own start cannot be cut once begun
	}
	cu, err := url.Parse(cfg.ClientURL)
	if err != nil {
		return nil, fmt.Errorf("client url: %w", err)
	}
	pu, err := url.Parse(cfg.PeerURL)
	if err != nil {
		return nil, fmt.Errorf("peer url: %w", err)
	}
	p, err := EnsurePKI(cfg.PKIDir, hostsOf(cfg)...)
	if err != nil {
		return nil, err
	}
	clientTLS, err := tlsInfo(p.Client, false).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("embedded etcd client TLS: %w", err)
	}
	ec := embed.NewConfig()
	ec.Name = cfg.Name
	// Mutual TLS on both URLs: a client or peer must present a certificate of the member's CA.
	ec.ClientTLSInfo, ec.PeerTLSInfo = tlsInfo(p.Server, true), tlsInfo(p.Server, true)
	ec.QuotaBackendBytes = cfg.QuotaBytes
	ec.Dir = cfg.Dir
	ec.ListenClientUrls, ec.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	ec.ListenPeerUrls, ec.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	ec.InitialCluster = cfg.Name + "=" + cfg.PeerURL
	if cfg.InitialCluster != "" {
		ec.InitialCluster = cfg.InitialCluster
		ec.InitialClusterToken = "detour-test-cluster"
	}
	ec.LogLevel = cfg.LogLevel
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	guard := &statusGuard{}
	ec.GRPCAdditionalServerOptions = append(ec.GRPCAdditionalServerOptions, grpc.ChainUnaryInterceptor(guard.intercept))
	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd in %s: %w", cfg.Dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd: %w", err)
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("embedded etcd in %s did not become ready in 60s", cfg.Dir)
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	}
	return &Server{etcd: e, cfg: cfg, pki: p, clientTLS: clientTLS, status: guard}, nil
}

func tlsInfo(f pki.Files, server bool) transport.TLSInfo {
	return transport.TLSInfo{CertFile: f.Cert, KeyFile: f.Key, TrustedCAFile: f.CA, ClientCertAuth: server}
}

// hostsOf are the hosts the member's certificate must name besides loopback.
func hostsOf(cfg Config) []string {
	var hosts []string
	for _, u := range append([]string{cfg.ClientURL, cfg.PeerURL}, peerURLs(cfg.InitialCluster)...) {
		if h := urlHost(u); h != "" {
			hosts = append(hosts, h)
		}
	}
	return hosts
}

func peerURLs(initialCluster string) []string {
	var out []string
	for _, m := range strings.Split(initialCluster, ",") {
		if _, u, ok := strings.Cut(m, "="); ok {
			out = append(out, u)
		}
	}
	return out
}

// Endpoint is the client URL.
func (s *Server) Endpoint() string { return s.cfg.ClientURL }

// PKI is the member's CA and certificates; PKI().Client is what a client presents (etcdctl
// --cacert, --cert, --key).
func (s *Server) PKI() PKI { return s.pki }

// ClientConfig is a client configuration that reaches this member: its endpoint and the client
// certificate of its PKI.
func (s *Server) ClientConfig() clientv3.Config {
	return clientv3.Config{Endpoints: []string{s.Endpoint()}, TLS: s.clientTLS.Clone(), DialTimeout: 5 * time.Second,
		Logger: zap.NewNop()}
}

// ClientConfigFor is a client configuration for an embedded etcd this process did not start
// (another process's, on the same machine): its endpoint and the client certificate of the PKI
// in pkiDir (the member's Config.PKIDir: by default its data directory with "-pki" appended).
func ClientConfigFor(endpoint, pkiDir string) (clientv3.Config, error) {
	tc, err := tlsInfo(PKIFiles(pkiDir).Client, false).ClientConfig()
	if err != nil {
		return clientv3.Config{}, fmt.Errorf("embedded etcd client TLS from %s: %w", pkiDir, err)
	}
	return clientv3.Config{Endpoints: []string{endpoint}, TLS: tc, DialTimeout: 5 * time.Second, Logger: zap.NewNop()}, nil
}

// Range reads up to limit keys of [key, end) at revision rev from this member's store, in
// process (a local read: no agreement among members is asked for): what a serializable Range over
// gRPC would answer, without encoding it for the network
// and encrypting it. more says whether keys of the range are left after the last one returned.
// Keys left are not counted (a counted range walks every key left, for every call).
func (s *Server) Range(ctx context.Context, key, end string, rev, limit int64) (kvs []*mvccpb.KeyValue, more bool, err error) {
	resp, _, err := txn.Range(ctx, s.etcd.Server.Logger(), s.etcd.Server.KV(),
		&etcdserverpb.RangeRequest{Key: []byte(key), RangeEnd: []byte(end), Revision: rev, Limit: limit}, false)
	if err != nil {
		return nil, false, err
	}
	return resp.Kvs, resp.More, nil
}

// Revision is the member's current revision, read in process.
func (s *Server) Revision() int64 { return s.etcd.Server.KV().Rev() }

// QuotaBytes is the member's backend space quota.
func (s *Server) QuotaBytes() int64 { return s.cfg.QuotaBytes }

// IsLeader reports whether this member is the cluster's raft leader now.
func (s *Server) IsLeader() bool { return s.etcd.Server.Leader() == s.etcd.Server.MemberID() }

// Crash stops the member the way a crash does: raft stops at once, without handing leadership
// to another member (Close does hand it over), and its listeners close in the background. Close
// waits for that.
func (s *Server) Crash() {
	s.status.stop()
	s.etcd.Server.HardStop()
	go s.Close()
}

// Config is what the server was started with (ports filled in), to restart it on the same data.
func (s *Server) Config() Config { return s.cfg }

// Close stops the member. It may be called more than once.
func (s *Server) Close() {
	s.close.Do(func() {
		s.status.stop()
		s.etcd.Close()
	})
}

// StartCluster starts one member per directory on loopback ports and waits until all serve. The
// members share the PKI of the first (dirs[0] with "-pki" appended).
func StartCluster(ctx context.Context, dirs []string) ([]*Server, error) {
	return StartClusterQuota(ctx, dirs, 0)
}

// StartClusterQuota is StartCluster with a space quota for every member (0: DefaultQuotaBytes).
func StartClusterQuota(ctx context.Context, dirs []string, quota int64) ([]*Server, error) {
	if len(dirs) == 0 {
		return nil, errors.New("a cluster needs at least one member")
	}
	pkiDir := strings.TrimRight(dirs[0], "/") + "-pki"
	if _, err := EnsurePKI(pkiDir); err != nil {
		return nil, err
	}
	cfgs := make([]Config, len(dirs))
	var members []string
	for i, d := range dirs {
		c, err := FreeURL()
		if err != nil {
			return nil, err
		}
		p, err := FreeURL()
		if err != nil {
			return nil, err
		}
		cfgs[i] = Config{Dir: d, Name: fmt.Sprintf("m%d", i), ClientURL: c, PeerURL: p, PKIDir: pkiDir, QuotaBytes: quota}
		members = append(members, cfgs[i].Name+"="+p)
	}
	servers := make([]*Server, len(dirs))
	errs := make(chan error, len(dirs))
	for i := range cfgs {
		cfgs[i].InitialCluster = strings.Join(members, ",")
		go func() {
			var err error
			servers[i], err = Start(ctx, cfgs[i])
			errs <- err
		}()
	}
	var first error
	for range dirs {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		for _, s := range servers {
			if s != nil {
				s.Close()
			}
		}
		return nil, first
	}
	return servers, nil
}

// addrInUse reports whether err is a listener's "address already in use", wrapped or (as etcd's
// start reports some) only in its text.
func addrInUse(err error) bool {
	return errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use")
}
