// Package agent is the protocol-neutral core of the agent that runs beside an origin server. For a
// request a protocol front has named by a content key, Decide answers where its bytes come from:
// a Location to redirect the client to, the origin inline, or the origin inline while a Fill
// stores the response. Around that one decision the core keeps everything that is not a protocol:
// the control-plane connection and its gate, Place, the location cache (of locations), fill
// budgets and store breakers, fills into the store, the origin-access cache around a probe the
// front supplies, sampled location checks, the watched and ordered target set, the fleet
// registration, and the HTTP server's lifecycle. Every failure on Detour's side degrades to the
// inline answer.
//
// Fronts (internal/front/...) speak one protocol each: they route and parse requests, derive
// content keys (naming their protocol in them), advertise targets, and encode a decision as their
// protocol's answer. This package imports no wire-protocol package.
//
// An Agent has the lifecycle of an http.Server: build it with New from a Config, Mount the fronts,
// Serve client listeners (and ServeOps for /metrics, /healthz and /readyz), and Shutdown to drain.
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
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/logonce"
	"github.com/prometheus/client_golang/prometheus"
)

// Headers on the answers to cacheable requests: the request's content key (what `detourctl probe
// --explain` asks the control plane about; it is no secret, every location URL names it) and the
// agent's region.
const (
	HeaderContentKey = "Detour-Content-Key"
	HeaderRegion     = "Detour-Agent-Region"
)

// Store is what the agent needs of a blob store; BlobStore adapts a *blob.Store.
type Store interface {
	// Create starts an upload of bucket/name that creates the object only if it is absent.
	Create(ctx context.Context, bucket, name, mediaType, key string) Upload
	// Hash reads an object back and hashes it.
	Hash(ctx context.Context, bucket, name string) (blob.Result, error)
}

// Upload is one object being written. Commit makes it visible and returns what the store holds;
// it fails with blob.ErrExists when the object was already there. Abort leaves nothing behind.
type Upload interface {
	io.Writer
	Commit() (blob.Result, error)
	Abort()
}

// BlobStore adapts the GCS store to Store.
func BlobStore(s *blob.Store) Store { return blobStore{s} }

type blobStore struct{ *blob.Store }

func (b blobStore) Create(ctx context.Context, bucket, name, mediaType, key string) Upload {
	return b.Store.Create(ctx, bucket, name, mediaType, key)
}

// Config configures an Agent. Zero fields take the defaults that setDefaults documents.
type Config struct {
	// Origin is the base URL of the origin server (required): requests no front answers itself
	// are relayed there as they are.
	Origin *url.URL
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

	// MaxBodyBytes bounds every request body the agent relays, such as a push (default 4 GiB).
	MaxBodyBytes int64
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

	// Origin access control (DESIGN invariant 9): before a request is placed, Access asks the
	// origin whether it would serve this client (a probe the front for this kind of origin
	// supplies; nil: every client is allowed). OriginAuthTTL is how long its answer is reused for
	// the same credentials and repository (default 30s): a revoked credential keeps receiving
	// redirects for at most that long. OriginAuthCacheSize bounds the answers kept (default
	// 10000, least recently used go first), OriginAuthTimeout each check (default 5s; past it the
	// request goes to the origin as it is). OriginAuthHeaders are the request headers the origin
	// authenticates with (default Authorization and Cookie): the only ones a check carries, and
	// what the answer is cached under (as a salted SHA-256).
	Access              AccessProbe
	OriginAuthTTL       time.Duration
	OriginAuthCacheSize int
	OriginAuthTimeout   time.Duration
	OriginAuthHeaders   []string

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
	if c.AgentID == "" {
		c.AgentID, _ = os.Hostname()
	}
	if len(c.ControlPlanes) > 0 && c.Credentials == nil {
		return errors.New("agent: control-plane credentials are required (TLS, or insecure.NewCredentials() asked for explicitly)")
	}
	for _, d := range []struct {
		field *time.Duration
		def   time.Duration
	}{{&c.PlaceTimeout, 50 * time.Millisecond},
		{&c.ReadHeaderTimeout, 10 * time.Second}, {&c.ReadTimeout, 10 * time.Minute},
		{&c.WriteTimeout, 2 * time.Hour}, {&c.IdleTimeout, 2 * time.Minute},
		{&c.OriginAuthTTL, 30 * time.Second}, {&c.OriginAuthTimeout, 5 * time.Second}} {
		if *d.field <= 0 {
			*d.field = d.def
		}
	}
	for _, d := range []struct {
		field *int64
		def   int64
	}{{&c.FillQueueBytes, 64 << 20}, {&c.FillBytesTotal, 256 << 20}, {&c.MaxBodyBytes, 4 << 30}} {
		if *d.field <= 0 {
			*d.field = d.def
		}
	}
	for _, d := range []struct {
		field *int
		def   int
	}{{&c.MaxFills, 32}, {&c.MaxConcurrentRequests, 1024}, {&c.MaxConnections, 4096},
		{&c.MaxHeaderBytes, 64 << 10}, {&c.OriginAuthCacheSize, 10000}} {
		if *d.field <= 0 {
			*d.field = d.def
		}
	}
	if c.LocationCacheEntries == 0 {
		c.LocationCacheEntries = 100000
	}
	if c.LocationCacheMaxAge == 0 {
		c.LocationCacheMaxAge = time.Minute
	}
	if c.RegisterInterval == 0 {
		c.RegisterInterval = 10 * time.Second
	}
	if c.Version == "" {
		c.Version = buildVersion()
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

// A Front answers one protocol's requests. Wrap returns a handler that takes the requests that are
// the front's and hands every other one to next (the next front, and after the last one the plain
// relay to the origin).
type Front interface {
	Wrap(next http.Handler) http.Handler
}

// Agent is the core shared by the fronts in front of one origin.
type Agent struct {
	cfg     Config
	proxy   *httputil.ReverseProxy
	client  *http.Client
	log     *slog.Logger
	once    *logonce.Set
	metrics *Metrics
	handler atomic.Pointer[http.Handler] // the mounted fronts

	conn      *grpc.ClientConn // nil without control planes
	placement pb.PlacementServiceClient
	cp        cpGate
	store     Store
	ownStore  *blob.Store // closed at Shutdown when the agent made it

	cache      *locationCache
	targets    atomic.Pointer[TargetSet]
	access     *access                  // nil without an access probe
	public     atomic.Pointer[[]string] // advertised targets whose URLs are not signed
	anonDenied atomic.Bool              // the origin's latest answer to an anonymous client was a refusal
	breakers   storeBreakers
	budget     fillBudget
	inFlight   chan struct{} // one token per request being answered
	checks     chan struct{} // bounds concurrent location checks

	// For the fleet view: the revision of the last WatchTargets message applied, the time of the
	// last Place (unix ns), and a nudge to report after a new target set.
	appliedRevision atomic.Int64
	lastPlace       atomic.Int64
	applied         chan struct{}

	// Background work (fills, reports, checks, fronts' own work, the target watch) runs under bg
	// until Shutdown.
	bg       context.Context
	stopBg   context.CancelFunc
	fillCtx  context.Context // cancelled when Shutdown gives up on fills
	stopFill context.CancelFunc
	work     sync.WaitGroup // fills, reports, aborts, checks, fronts' background work
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
	a := &Agent{cfg: cfg, log: cfg.Log, once: logonce.New(cfg.Log), metrics: newMetrics(),
		client: &http.Client{Transport: cfg.Transport}, inFlight: make(chan struct{}, cfg.MaxConcurrentRequests),
		checks: make(chan struct{}, 4), applied: make(chan struct{}, 1)}
	a.budget = fillBudget{maxFills: int64(cfg.MaxFills), maxBytes: cfg.FillBytesTotal}
	a.cache = newLocationCache(cfg.LocationCacheEntries, cfg.LocationCacheMaxAge, a.metrics)
	a.breakers = storeBreakers{log: a.once, m: map[string]*storeBreaker{}}
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
	a.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(cfg.Origin)
			pr.SetXForwarded()
		},
		Transport:     cfg.Transport,
		FlushInterval: -1, // answers reach the client as the origin sends them
		BufferPool:    relayBuffers,
		ErrorHandler:  a.proxyError,
	}
	a.bg, a.stopBg = context.WithCancel(context.WithoutCancel(ctx))
	a.fillCtx, a.stopFill = context.WithCancel(a.bg)
	if cfg.Access != nil {
		a.access = newAccess(a.bg, &a.cfg, a.metrics, a.once)
		a.metrics.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_agent_origin_auth_cache_entries",
			Help: "Origin access answers cached (per credentials and repository)."}, func() float64 { return float64(a.access.cache.len()) }))
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
		a.store, a.ownStore = BlobStore(st), st
	}
	a.Mount()
	return a, nil
}

// Mount sets the fronts that answer clients, outermost first; a request none of them takes is
// relayed to the origin as it is. Mount them before Serve.
func (a *Agent) Mount(fronts ...Front) {
	var h http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { a.Relay(w, r, "passthrough") })
	for i := len(fronts) - 1; i >= 0; i-- {
		h = fronts[i].Wrap(h)
	}
	a.handler.Store(&h)
}

// Metrics returns the agent's metrics; fronts register theirs on its Registry.
func (a *Agent) Metrics() *Metrics { return a.metrics }

// Log is the agent's logger; Once logs a lasting condition once until it is forgotten.
func (a *Agent) Log() *slog.Logger  { return a.log }
func (a *Agent) Once() *logonce.Set { return a.once }

// Region is the agent's region.
func (a *Agent) Region() string { return a.cfg.Region }

// Origin is the origin's base URL.
func (a *Agent) Origin() *url.URL { return a.cfg.Origin }

// OriginClient reaches the origin; OriginURL is the origin's URL for a client request's path and
// query.
func (a *Agent) OriginClient() *http.Client { return a.client }

func (a *Agent) OriginURL(r *http.Request) string {
	u := *a.cfg.Origin
	u.Path = JoinPath(u.Path, r.URL.Path)
	u.RawPath = ""
	u.RawQuery = r.URL.RawQuery
	return u.String()
}

// JoinPath appends a request path to a base URL's path.
func JoinPath(base, p string) string {
	switch {
	case base == "" || base == "/":
		return p
	case base[len(base)-1] == '/' && len(p) > 0 && p[0] == '/':
		return base + p[1:]
	}
	return base + p
}

// Redirecting reports whether the agent can hand out redirects at all (it has a control plane).
func (a *Agent) Redirecting() bool { return a.placement != nil }

// ServeHTTP bounds the requests answered at once and the size of their bodies, then lets the
// fronts answer.
func (a *Agent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	select {
	case a.inFlight <- struct{}{}:
		defer func() { <-a.inFlight }()
	default:
		a.Count("overloaded")
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
		a.Count("rejected")
		http.Error(w, fmt.Sprintf("detour agent: request body of %d bytes exceeds the limit of %d", r.ContentLength, a.cfg.MaxBodyBytes),
			http.StatusRequestEntityTooLarge)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, a.cfg.MaxBodyBytes)
	(*a.handler.Load()).ServeHTTP(w, r)
}

// Count counts one answered request by outcome (detour_agent_requests_total).
func (a *Agent) Count(outcome string) { a.metrics.requests.WithLabelValues(outcome).Inc() }

// Relay sends r to the origin and its answer back, unchanged, counting it under outcome (and its
// bytes under OtherCommand; RelayAs names the command).
func (a *Agent) Relay(w http.ResponseWriter, r *http.Request, outcome string) {
	a.RelayAs(w, r, outcome, OtherCommand)
}

// bodyErrKey carries a *bodyErrReader in a relayed request's context, so the proxy's error
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
		// The client went away (or half-closed its connection, which net/http reports the same
		// way): nobody reads an answer, and an empty 200 would look like one. Cut the connection.
		panic(http.ErrAbortHandler)
	}
	a.OriginFailed(err)
	http.Error(w, "detour agent: origin unreachable", http.StatusBadGateway)
}

// OriginFailed logs (once while it lasts) that the origin could not be reached.
func (a *Agent) OriginFailed(err error) {
	a.once.Warn("origin", "origin unreachable", "origin", a.cfg.Origin.Redacted(), "err", err)
}

// Go runs fn in the background under the agent's lifecycle: ctx ends when Shutdown gives up on
// background work, and Shutdown waits for fn to return.
func (a *Agent) Go(fn func(ctx context.Context)) {
	a.work.Add(1)
	go func() {
		defer a.work.Done()
		fn(a.fillCtx)
	}()
}
