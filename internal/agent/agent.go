// Package agent is the wire-protocol front that runs beside an origin server: it forwards what it
// need not touch, rewrites the capabilities' redirect section to the live target set, and for
// cacheable commands asks the control plane where the response lives, answering with a redirect or
// streaming the origin's answer inline (filling a store on the way). Every failure on Detour's
// side degrades to the inline answer.
//
// An Agent has the lifecycle of an http.Server: build it with New from a Config, Serve client
// listeners (and ServeOps for /metrics, /healthz and /readyz), and Shutdown to drain.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/logonce"
	"github.com/detourhq/detour/internal/wire"
	"github.com/prometheus/client_golang/prometheus"
)

// Store is what the agent needs of a blob store (blob.Store implements it).
type Store interface {
	Create(ctx context.Context, bucket, name, mediaType, key string) *blob.Upload
	Hash(ctx context.Context, bucket, name string) (blob.Result, error)
}

// Config configures an Agent. Zero fields take the defaults that setDefaults documents.
type Config struct {
	// Origin is the base URL of the origin server (required).
	Origin *url.URL
	// RepoID names the origin's repository in content keys (default: Origin).
	RepoID string
	// Region is the agent's region, where it prefers to fill and to redirect. Empty means the
	// agent never fills (it still redirects); New logs that.
	Region string
	// AgentID names the agent in fill claims and the fleet view (default: the host name). The
	// fleet view's id is the agent's certificate identity.
	AgentID string
	// RegisterInterval is how often the agent reports itself to the control plane's fleet view
	// (default 10s; negative: never); Version is what it reports as its version (default: the
	// build's).
	RegisterInterval time.Duration
	Version          string

	// ControlPlanes are the control-plane replicas' gRPC addresses; calls are balanced round-robin
	// over those that are up. Empty: no redirects, every request goes to the origin.
	ControlPlanes []string
	// Credentials secure the connections to the control plane; required with ControlPlanes.
	// Plaintext must be asked for explicitly, with insecure.NewCredentials().
	Credentials credentials.TransportCredentials
	// PlaceTimeout bounds each Place call; past it the answer is inline (default 50ms).
	PlaceTimeout time.Duration
	// Cacheable are the commands whose responses may be redirected (default DefaultCacheable).
	Cacheable []string
	// LocationCacheEntries bounds the redirects the agent reuses without asking the control
	// plane (default 100 000; negative: no cache), each for at most LocationCacheMaxAge (default
	// 1m) and never past what the control plane allows.
	LocationCacheEntries int
	LocationCacheMaxAge  time.Duration

	// Store receives fills. nil: a GCS client for StoreEndpoint is made (empty endpoint: Google
	// Cloud Storage with the default credentials); if that fails, the agent never fills.
	Store         Store
	StoreEndpoint string
	// NoFills: the agent never fills, only redirects to what others stored.
	NoFills bool
	// FillQueueBytes bounds the bytes one fill may fall behind the client before it is aborted
	// (default 64 MiB); FillBytesTotal bounds the bytes all fills together hold (default 256 MiB)
	// and MaxFills how many run at once (default 32). Past either bound new fills are declined
	// before a claim is taken: the agent tells Place it cannot fill.
	FillQueueBytes int64
	FillBytesTotal int64
	MaxFills       int

	// MaxRequestBytes bounds a v2 command request body (default wire.DefaultMaxRequest) and
	// CommandBodyTimeout the time to read it (default 30s). MaxBodyBytes bounds every other
	// request body the agent relays, such as a push (default 4 GiB).
	MaxRequestBytes    int64
	CommandBodyTimeout time.Duration
	MaxBodyBytes       int64
	// MaxConcurrentRequests bounds the requests being answered at once; past it a request gets
	// HTTP 503 at once (default 1024). MaxConnections bounds open client connections; past it new
	// ones wait to be accepted (default 4096).
	MaxConcurrentRequests int
	MaxConnections        int
	// HTTP server limits (defaults: header 10s, whole request 10m, response 2h — a 10 GB answer at
	// 1.5 MB/s — idle keep-alive 2m, 64 KiB of headers).
	ReadHeaderTimeout time.Duration
	ReadTimeout       time.Duration
	WriteTimeout      time.Duration
	IdleTimeout       time.Duration
	MaxHeaderBytes    int

	// Origin access control (DESIGN invariant 9): before a cacheable request is placed, the
	// origin is asked whether it would serve this client (see originauth.go). OriginAuthTTL is how
	// long its answer is reused for the same credentials and repository (default 30s): a revoked
	// credential keeps receiving redirects for at most that long. OriginAuthCacheSize bounds the
	// answers kept (default 10000, least recently used go first), OriginAuthTimeout each check
	// (default 5s; past it the request goes to the origin as it is). OriginAuthHeaders are the
	// request headers the origin authenticates with (default Authorization and Cookie): the only
	// ones a check carries, and what the answer is cached under (as a salted SHA-256).
	OriginAuthTTL       time.Duration
	OriginAuthCacheSize int
	OriginAuthTimeout   time.Duration
	OriginAuthHeaders   []string
	// NoOriginAuth skips the check, for an origin that serves every client: then nothing the
	// agent redirects is protected anyway, and each cacheable request is one origin request
	// cheaper per TTL.
	NoOriginAuth bool

	// CheckLocations is the share of redirects whose location the agent fetches (HEAD) in the
	// background to check that it serves the object; a broken one is reported to the control
	// plane, which verifies and removes it (0: none).
	CheckLocations float64
	// Transport reaches the origin (default: a clone of http.DefaultTransport).
	Transport http.RoundTripper
	Log       *slog.Logger
}

func (c *Config) setDefaults() error {
	if c.Origin == nil || c.Origin.Scheme == "" || c.Origin.Host == "" {
		return errors.New("agent: an absolute origin URL is required")
	}
	if c.RepoID == "" {
		c.RepoID = c.Origin.String()
	}
	if c.AgentID == "" {
		c.AgentID, _ = os.Hostname()
	}
	if len(c.ControlPlanes) > 0 && c.Credentials == nil {
		return errors.New("agent: control-plane credentials are required (TLS, or insecure.NewCredentials() asked for explicitly)")
	}
	defaults := []struct {
		field *time.Duration
		def   time.Duration
	}{{&c.PlaceTimeout, 50 * time.Millisecond}, {&c.CommandBodyTimeout, 30 * time.Second},
		{&c.ReadHeaderTimeout, 10 * time.Second}, {&c.ReadTimeout, 10 * time.Minute},
		{&c.WriteTimeout, 2 * time.Hour}, {&c.IdleTimeout, 2 * time.Minute},
		{&c.OriginAuthTTL, 30 * time.Second}, {&c.OriginAuthTimeout, 5 * time.Second}}
	for _, d := range defaults {
		if *d.field <= 0 {
			*d.field = d.def
		}
	}
	if len(c.Cacheable) == 0 {
		c.Cacheable = DefaultCacheable
	}
	if c.LocationCacheEntries == 0 {
		c.LocationCacheEntries = 100000
	}
	if c.RegisterInterval == 0 {
		c.RegisterInterval = 10 * time.Second
	}
	if c.Version == "" {
		c.Version = buildVersion()
	}
	if c.LocationCacheMaxAge == 0 {
		c.LocationCacheMaxAge = time.Minute
	}
	if c.FillQueueBytes <= 0 {
		c.FillQueueBytes = 64 << 20
	}
	if c.FillBytesTotal <= 0 {
		c.FillBytesTotal = 256 << 20
	}
	if c.MaxFills <= 0 {
		c.MaxFills = 32
	}
	if c.MaxRequestBytes <= 0 {
		c.MaxRequestBytes = wire.DefaultMaxRequest
	}
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = 4 << 30
	}
	if c.MaxConcurrentRequests <= 0 {
		c.MaxConcurrentRequests = 1024
	}
	if c.MaxConnections <= 0 {
		c.MaxConnections = 4096
	}
	if c.MaxHeaderBytes <= 0 {
		c.MaxHeaderBytes = 64 << 10
	}
	if c.OriginAuthCacheSize <= 0 {
		c.OriginAuthCacheSize = 10000
	}
	if len(c.OriginAuthHeaders) == 0 {
		c.OriginAuthHeaders = []string{"Authorization", "Cookie"}
	}
	if c.Transport == nil {
		// One origin, many concurrent clients: keep enough idle connections to it that answers
		// do not pay a new connection each (the default keeps two per host).
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxIdleConns, t.MaxIdleConnsPerHost = 1024, 1024
		c.Transport = t
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
	return nil
}

// Agent serves the wire protocol in front of one origin.
type Agent struct {
	cfg       Config
	cacheable map[string]bool
	proxy     *httputil.ReverseProxy
	client    *http.Client
	log       *slog.Logger
	once      *logonce.Set
	metrics   *Metrics

	conn      *grpc.ClientConn // nil without control planes
	placement pb.PlacementServiceClient
	cp        cpGate
	store     Store
	ownStore  *blob.Store // closed at Shutdown when the agent made it

	cache        *locationCache
	section      atomic.Pointer[wire.RedirectSection]
	targetsKnown atomic.Bool
	auth         *originAuth              // nil with NoOriginAuth
	public       atomic.Pointer[[]string] // advertised targets whose URLs are not signed
	anonDenied   atomic.Bool              // the origin's latest answer to an anonymous client was a refusal
	breakers     storeBreakers
	budget       fillBudget
	inFlight     chan struct{} // one token per request being answered
	checks       chan struct{} // bounds concurrent location checks

	// For the fleet view: the revision of the last WatchTargets message applied, the time of the
	// last Place (unix ns), and a nudge to report after a new target set.
	appliedRevision atomic.Int64
	lastPlace       atomic.Int64
	applied         chan struct{}

	// Background work (fills, reports, checks, the target watch) runs under bg until Shutdown.
	bg       context.Context
	stopBg   context.CancelFunc
	fillCtx  context.Context // cancelled when Shutdown gives up on fills
	stopFill context.CancelFunc
	fills    sync.WaitGroup // fills, reports, aborts, checks
	loops    sync.WaitGroup // the target watch, the fleet registration and the control-plane probe
	start    sync.Once

	mu       sync.Mutex
	servers  []*http.Server
	shutdown atomic.Bool
}

// New builds an agent: it prepares (but does not wait for) the control-plane connection and the
// store client. Serve starts the background work.
func New(ctx context.Context, cfg Config) (*Agent, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	a := &Agent{cfg: cfg, cacheable: map[string]bool{}, log: cfg.Log, once: logonce.New(cfg.Log), metrics: newMetrics(),
		client: &http.Client{Transport: cfg.Transport}, inFlight: make(chan struct{}, cfg.MaxConcurrentRequests),
		checks: make(chan struct{}, 4), applied: make(chan struct{}, 1)}
	a.budget = fillBudget{maxFills: int64(cfg.MaxFills), maxBytes: cfg.FillBytesTotal}
	a.cache = newLocationCache(cfg.LocationCacheEntries, cfg.LocationCacheMaxAge, a.metrics)
	a.metrics.Registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_agent_requests_in_flight", Help: "Requests being answered."},
			func() float64 { return float64(len(a.inFlight)) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_agent_location_cache_entries", Help: "Redirects the agent reuses without asking the control plane."},
			func() float64 { return float64(a.cache.len()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_agent_fills_active", Help: "Fills running."},
			func() float64 { return float64(a.budget.active.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_agent_fill_queued_bytes", Help: "Bytes all fills hold waiting for their store."},
			func() float64 { return float64(a.budget.queued.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_agent_store_breakers_open", Help: "Targets this agent does not fill because their uploads failed."},
			func() float64 { return float64(len(a.breakers.unfillable(time.Now()))) }),
	)
	a.breakers = storeBreakers{log: a.once, m: map[string]*storeBreaker{}}
	for _, c := range cfg.Cacheable {
		c = strings.TrimSpace(c)
		if _, ok := contentAddressed[c]; !ok {
			return nil, fmt.Errorf("agent: command %q cannot be cached: its response is not addressed by its arguments (cacheable: manifestdata, filedata, filesdata, changesetdata)", c)
		}
		a.cacheable[c] = true
	}
	a.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(cfg.Origin)
			pr.SetXForwarded()
		},
		Transport:     cfg.Transport,
		FlushInterval: -1, // frames reach the client as the origin sends them
		BufferPool:    relayBuffers,
		ErrorHandler:  a.proxyError,
	}
	a.bg, a.stopBg = context.WithCancel(context.WithoutCancel(ctx))
	a.fillCtx, a.stopFill = context.WithCancel(a.bg)
	if !cfg.NoOriginAuth {
		a.auth = newOriginAuth(a.bg, &a.cfg, a.metrics, a.once)
		a.metrics.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_agent_origin_auth_cache_entries",
			Help: "Origin access answers cached (per credentials and repository)."}, func() float64 { return float64(a.auth.cache.len()) }))
	}
	if len(cfg.ControlPlanes) > 0 {
		conn, err := dialControlPlane(cfg.ControlPlanes, cfg.Credentials)
		if err != nil {
			return nil, fmt.Errorf("agent: control plane %v: %w", cfg.ControlPlanes, err)
		}
		a.conn, a.placement = conn, pb.NewPlacementServiceClient(conn)
		a.cp.init(conn)
	}
	a.store = cfg.Store
	switch {
	case cfg.NoFills || a.placement == nil:
	case cfg.Region == "":
		a.log.Warn("no region: this agent never fills, it only redirects to what others stored (set --region to fill)")
	case a.store == nil:
		st, err := blob.NewStore(ctx, blob.Options{Endpoint: cfg.StoreEndpoint})
		if err != nil {
			a.log.Warn("no storage client: this agent never fills", "err", err)
			break
		}
		a.store, a.ownStore = st, st
	}
	return a, nil
}

// Metrics returns the agent's metrics.
func (a *Agent) Metrics() *Metrics { return a.metrics }

// Section is the redirect section currently advertised (nil before the first target set).
func (a *Agent) Section() *wire.RedirectSection { return a.section.Load() }

// canFill reports whether the agent would take a fill grant now.
func (a *Agent) canFill() bool {
	return a.store != nil && a.cfg.Region != "" && !a.cfg.NoFills && a.budget.canStart()
}

const commandPathMarker = "/api/" + wire.APIVersion + "/"

// ServeHTTP routes a request: the capabilities handshake, v2 commands, or the plain proxy.
func (a *Agent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	select {
	case a.inFlight <- struct{}{}:
		defer func() { <-a.inFlight }()
	default:
		a.metrics.requests.WithLabelValues("overloaded").Inc()
		a.once.Warn("overloaded", "request limit reached; answering 503 until requests finish",
			"max_concurrent_requests", a.cfg.MaxConcurrentRequests)
		w.Header().Set("Retry-After", "1")
		http.Error(w, "detour agent: too many requests in flight", http.StatusServiceUnavailable)
		return
	}
	if len(a.inFlight) < cap(a.inFlight)/2 {
		a.once.Recovered("overloaded", "request load back under the limit")
	}
	if r.ContentLength > a.cfg.MaxBodyBytes {
		a.metrics.requests.WithLabelValues("rejected").Inc()
		http.Error(w, fmt.Sprintf("detour agent: request body of %d bytes exceeds the limit of %d", r.ContentLength, a.cfg.MaxBodyBytes),
			http.StatusRequestEntityTooLarge)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, a.cfg.MaxBodyBytes)
	if r.Method == http.MethodGet && r.URL.Query().Get("cmd") == "capabilities" {
		a.serveHandshake(w, r)
		return
	}
	if r.Method == http.MethodPost {
		if i := strings.Index(r.URL.Path, commandPathMarker); i >= 0 {
			rest := r.URL.Path[i+len(commandPathMarker):]
			if perm, cmd, ok := strings.Cut(rest, "/"); ok && perm == "ro" && cmd != "" && !strings.Contains(cmd, "/") {
				a.serveCommand(w, r, cmd)
				return
			}
		}
	}
	a.metrics.requests.WithLabelValues("passthrough").Inc()
	a.proxy.ServeHTTP(w, recordBodyErr(r))
}

// bodyErrKey carries a *bodyErrReader in a proxied request's context, so the proxy's error
// handler can tell a client's broken body from an unreachable origin.
type bodyErrKey struct{}

type bodyErrReader struct {
	io.ReadCloser
	err atomic.Value // error
}

func (b *bodyErrReader) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		b.err.Store(err)
	}
	return n, err
}

func recordBodyErr(r *http.Request) *http.Request {
	if r.Body == nil || r.Body == http.NoBody {
		return r
	}
	br := &bodyErrReader{ReadCloser: r.Body}
	r = r.WithContext(context.WithValue(r.Context(), bodyErrKey{}, br))
	r.Body = br
	return r
}

// proxyError answers a request the origin could not be asked or did not answer, saying which.
func (a *Agent) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	if br, ok := r.Context().Value(bodyErrKey{}).(*bodyErrReader); ok {
		if berr, _ := br.err.Load().(error); berr != nil {
			var tooBig *http.MaxBytesError
			if errors.As(berr, &tooBig) {
				http.Error(w, fmt.Sprintf("detour agent: request body exceeds the limit of %d bytes", tooBig.Limit), http.StatusRequestEntityTooLarge)
				return
			}
			http.Error(w, "detour agent: cannot read the request body: "+berr.Error(), http.StatusBadRequest)
			return
		}
	}
	if r.Context().Err() != nil {
		return // the client went away; nobody reads an answer
	}
	a.once.Warn("origin", "origin unreachable", "origin", a.cfg.Origin.String(), "err", err)
	http.Error(w, "detour agent: origin unreachable", http.StatusBadGateway)
}
