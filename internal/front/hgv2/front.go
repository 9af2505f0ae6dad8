// Package hgv2 is the agent's front for Mercurial's wire protocol version 2 (Mercurial 4.8–5.9,
// with its experimental settings on): content redirects per command. It routes the protocol's
// requests, parses their frames, decides which commands' responses are content-addressed and
// derives their content keys, advertises the agent's targets in the capabilities, encodes the
// core's decisions as the protocol's answers (a redirect, or the origin's frames relayed while the
// response's objects are teed into a fill), and leaves everything else to the next handler.
//
// It decides no placement and talks to no control plane: that is the core's (internal/agent).
package hgv2

import (
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/wire"
)

// Config configures the front. Zero fields take defaults.
type Config struct {
	// RepoID names the origin's repository in content keys (default: the origin's URL).
	RepoID string
	// Cacheable are the commands whose responses may be redirected (default DefaultCacheable).
	Cacheable []string
	// MaxRequestBytes bounds a command request body (default wire.DefaultMaxRequest) and
	// CommandBodyTimeout the time to read it (default 30s).
	MaxRequestBytes    int64
	CommandBodyTimeout time.Duration
	// BatchSize is the recommendedbatchsize advertised for manifestdata and filesdata. 0 (the
	// default): BatchSizeFor the repository's changesets, learned from the origin and from clones
	// (batch.go); positive: that size for every repository; negative: the origin's own sizes.
	BatchSize int
	// SizeProbeTimeout bounds how long the first handshake for a repository whose size the front
	// does not know waits while the origin is asked (default 10s). Past it that handshake carries
	// the origin's sizes, and the answer, when it comes, serves the next.
	SizeProbeTimeout time.Duration
}

// Front answers protocol-v2 requests on an agent core.
type Front struct {
	a           *agent.Agent
	cfg         Config
	cacheable   map[string]bool
	uncacheable *prometheus.CounterVec
	batchSizes  *prometheus.CounterVec
	sizes       sizer
	// section is the redirect section advertised for the core's current target set.
	section atomic.Pointer[advertisement]
}

// New makes the front for core a.
func New(a *agent.Agent, cfg Config) (*Front, error) {
	if cfg.RepoID == "" {
		cfg.RepoID = a.Origin().String()
	}
	if len(cfg.Cacheable) == 0 {
		cfg.Cacheable = DefaultCacheable
	}
	if cfg.MaxRequestBytes <= 0 {
		cfg.MaxRequestBytes = wire.DefaultMaxRequest
	}
	if cfg.CommandBodyTimeout <= 0 {
		cfg.CommandBodyTimeout = 30 * time.Second
	}
	if cfg.SizeProbeTimeout <= 0 {
		cfg.SizeProbeTimeout = 10 * time.Second
	}
	f := &Front{a: a, cfg: cfg, cacheable: map[string]bool{},
		uncacheable: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_agent_uncacheable_total",
			Help: "Requests for a cacheable command kept inline because they ask for repository state (e.g. changesetdata with bookmarks)."},
			[]string{"command", "reason"}),
		batchSizes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_agent_batch_size_advertisements_total",
			Help: "Capabilities answers by what they advertise as manifestdata and filesdata batch sizes: rewritten (the front's), origin_unknown_size (the origin's: the repository's size is not known yet)."},
			[]string{"result"})}
	for _, c := range cfg.Cacheable {
		c = strings.TrimSpace(c)
		if _, ok := contentAddressed[c]; !ok {
			return nil, fmt.Errorf("hgv2: command %q cannot be cached: its response is not addressed by its arguments (cacheable: manifestdata, filedata, filesdata, changesetdata)", c)
		}
		f.cacheable[c] = true
	}
	for _, c := range []prometheus.Collector{f.uncacheable, f.batchSizes} {
		if err := a.Metrics().Registry.Register(c); err != nil {
			return nil, fmt.Errorf("hgv2: metrics: %w", err)
		}
	}
	return f, nil
}

const commandPathMarker = "/api/" + wire.APIVersion + "/"

// Wrap routes the capabilities handshake and read-only v2 commands to the front, and every other
// request to next.
func (f *Front) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && r.URL.Query().Get("cmd") == "capabilities" && wantsV2(r) {
			f.serveHandshake(w, r)
			return
		}
		if r.Method == http.MethodPost {
			if i := strings.Index(r.URL.Path, commandPathMarker); i >= 0 {
				rest := r.URL.Path[i+len(commandPathMarker):]
				if perm, cmd, ok := strings.Cut(rest, "/"); ok && perm == "ro" && cmd != "" && !strings.Contains(cmd, "/") {
					f.serveCommand(w, r, cmd, next)
					return
				}
			}
		}
		next.ServeHTTP(w, r)
	})
}

// wantsV2 reports whether a capabilities request asks to upgrade to protocol v2 (the client sends
// X-HgUpgrade-1 naming the v2 API, and X-HgProto-1 with cbor): only such a client gets the CBOR
// handshake the front rewrites; any other gets the v1 capabilities, which are the next handler's.
func wantsV2(r *http.Request) bool {
	for _, v := range r.Header.Values("X-HgUpgrade-1") {
		if strings.Contains(v, wire.APIVersion) {
			return true
		}
	}
	return false
}

// repoOf returns the repository part of a v2 command's path: what precedes /api/<version>/, as
// the client wrote it ("" for the origin's root). The client's own handshake went to that path
// with ?cmd=capabilities.
func repoOf(path string) string {
	if i := strings.Index(path, commandPathMarker); i >= 0 {
		return path[:i]
	}
	return ""
}
