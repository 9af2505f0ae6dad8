// Package agent is the wire-protocol front that runs beside an origin server: it forwards what it
// need not touch, rewrites the capabilities' redirect section to the live target set, and for
// cacheable commands asks the control plane where the response lives, answering with a redirect or
// streaming the origin's answer inline (filling a store on the way). Every failure on Detour's
// side degrades to the inline answer.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/wire"
)

// Placement is what the agent needs of the control plane.
type Placement interface {
	Place(ctx context.Context, in *pb.PlaceRequest, opts ...grpc.CallOption) (*pb.PlaceResponse, error)
	ReportFill(ctx context.Context, in *pb.ReportFillRequest, opts ...grpc.CallOption) (*pb.ReportFillResponse, error)
	ReportBrokenLocation(ctx context.Context, in *pb.ReportBrokenLocationRequest, opts ...grpc.CallOption) (*pb.ReportBrokenLocationResponse, error)
	AbortFill(ctx context.Context, in *pb.AbortFillRequest, opts ...grpc.CallOption) (*pb.AbortFillResponse, error)
	WatchTargets(ctx context.Context, in *pb.WatchTargetsRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[pb.WatchTargetsResponse], error)
}

// Store is what the agent needs of a blob store.
type Store interface {
	Create(ctx context.Context, bucket, name, mediaType, key string) *blob.Upload
	Hash(ctx context.Context, bucket, name string) (blob.Result, error)
}

// Config configures an Agent. Zero fields take defaults.
type Config struct {
	Origin       *url.URL // base URL of the origin (required)
	RepoID       string   // identity of the origin's repository in content keys (default: Origin)
	Region       string
	AgentID      string
	PlaceTimeout time.Duration // default 50ms
	Cacheable    []string      // default DefaultCacheable
	Placement    Placement     // nil: every command is answered inline, nothing is redirected
	Store        Store         // nil: no fills
	// FillQueueBytes bounds the bytes waiting for the store; a fill that falls this far behind the
	// client is aborted rather than slowing the client (default 64 MiB).
	FillQueueBytes int64
	// MaxRequestBytes bounds a command request body (default wire.DefaultMaxRequest).
	MaxRequestBytes int64
	// CheckLocations is the share of redirects whose location the agent fetches (HEAD) in the
	// background to check that it serves the object; a broken one is reported to the control
	// plane, which verifies and removes it (0: none).
	CheckLocations float64
	Transport      http.RoundTripper // to the origin (default http.DefaultTransport)
	Log            *slog.Logger
}

// Agent serves HTTP. Create it with New, start Run, serve it with an http.Server, and call
// Shutdown after the server's own Shutdown.
type Agent struct {
	cfg       Config
	cacheable map[string]bool
	proxy     *httputil.ReverseProxy
	client    *http.Client
	log       *slog.Logger
	metrics   *Metrics
	section   atomic.Pointer[wire.RedirectSection]
	fills     sync.WaitGroup
	fillCtx   context.Context
	stopFills context.CancelFunc
	breaker   breaker
	logOnce   sync.Map
	checks    chan struct{} // bounds concurrent location checks
}

// New builds an agent.
func New(cfg Config) (*Agent, error) {
	if cfg.Origin == nil {
		return nil, errors.New("agent: origin URL is required")
	}
	if cfg.RepoID == "" {
		cfg.RepoID = cfg.Origin.String()
	}
	if cfg.PlaceTimeout <= 0 {
		cfg.PlaceTimeout = 50 * time.Millisecond
	}
	if len(cfg.Cacheable) == 0 {
		cfg.Cacheable = DefaultCacheable
	}
	if cfg.FillQueueBytes <= 0 {
		cfg.FillQueueBytes = 64 << 20
	}
	if cfg.MaxRequestBytes <= 0 {
		cfg.MaxRequestBytes = wire.DefaultMaxRequest
	}
	if cfg.Transport == nil {
		cfg.Transport = http.DefaultTransport
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	a := &Agent{cfg: cfg, cacheable: map[string]bool{}, log: cfg.Log, metrics: newMetrics(),
		client: &http.Client{Transport: cfg.Transport}, checks: make(chan struct{}, 4)}
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
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			a.warnOnce("origin", "origin unreachable", "origin", cfg.Origin.String(), "err", err)
			http.Error(w, "origin unreachable", http.StatusBadGateway)
		},
	}
	a.fillCtx, a.stopFills = context.WithCancel(context.Background())
	return a, nil
}

// Metrics returns the agent's metrics.
func (a *Agent) Metrics() *Metrics { return a.metrics }

// Shutdown waits for background fills to report, until ctx ends; then it aborts the rest. Call it
// after the HTTP server has stopped taking requests.
func (a *Agent) Shutdown(ctx context.Context) error {
	done := make(chan struct{})
	go func() { a.fills.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		a.stopFills()
		<-done
		return ctx.Err()
	}
}

func (a *Agent) warnOnce(cause, msg string, args ...any) {
	if _, loaded := a.logOnce.LoadOrStore(cause, true); !loaded {
		a.log.Warn(msg, args...)
	}
}

func (a *Agent) recovered(cause, msg string) {
	if _, had := a.logOnce.LoadAndDelete(cause); had {
		a.log.Info(msg)
	}
}

const commandPathMarker = "/api/" + wire.APIVersion + "/"

// ServeHTTP routes a request: the capabilities handshake, v2 commands, or the plain proxy.
func (a *Agent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
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
	a.proxy.ServeHTTP(w, r)
}
