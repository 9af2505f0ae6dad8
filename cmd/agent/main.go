// Command agent runs Detour's agent in front of one origin server: the protocol-neutral core
// (internal/agent) and the protocol fronts the operator enables (internal/front/...). It only
// maps flags onto their configurations; everything else is in those packages.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc/credentials/insecure"

	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/envflag"
	"github.com/detourhq/detour/internal/flagcheck"
	"github.com/detourhq/detour/internal/front/hgbundle"
	"github.com/detourhq/detour/internal/front/hgv2"
	"github.com/detourhq/detour/internal/front/hgweb"
	"github.com/detourhq/detour/internal/memlimit"
	"github.com/detourhq/detour/internal/pki"
)

func main() {
	hostname, _ := os.Hostname()
	var (
		cfg                                         agent.Config
		v2                                          hgv2.Config
		bundles                                     hgbundle.Config
		bundleFormats                               string
		fronts                                      string
		noOriginAuth                                bool
		listen, opsListen, pprofListen, origin, cps string
		cacheable, logLevel, originAuthHeaders      string
		insecureCP                                  bool
		tlsFiles                                    pki.Files
		devPKI                                      string
		drain                                       time.Duration
	)
	flag.StringVar(&fronts, "fronts", "hgv2,hgbundle", "comma-separated protocol fronts to serve: hgv2 (content redirects for Mercurial 4.8-5.9 with protocol v2), hgbundle (clone bundles for every Mercurial since 3.6)")
	flag.IntVar(&bundles.Step, "bundle-step", 0, "changesets between clone bundles (0: follow each repository's size, 2^floor(log2(n/16)))")
	flag.StringVar(&bundleFormats, "bundle-formats", "zstd,gzip", "clone-bundle compressions to make, best first (zstd, gzip, none)")
	flag.StringVar(&listen, "listen", "127.0.0.1:8080", "HTTP listen address for clients")
	flag.StringVar(&opsListen, "metrics-listen", "127.0.0.1:8081", "listen address of /metrics, /healthz and /readyz (empty: none)")
	flag.StringVar(&pprofListen, "pprof-listen", "", "listen address of /debug/pprof/ (empty: none)")
	flag.StringVar(&origin, "origin", "", "base URL of the origin server (required), e.g. http://127.0.0.1:8000/")
	flag.StringVar(&cps, "controlplane", "127.0.0.1:7700", "comma-separated control-plane addresses (round-robin over those up); empty: no redirects")
	flag.BoolVar(&insecureCP, "insecure", false, "talk to the control plane in plaintext (development only)")
	flag.StringVar(&tlsFiles.CA, "tls-ca", "", "CA certificates the control plane's certificate must chain to")
	flag.StringVar(&tlsFiles.Cert, "tls-cert", "", "this agent's client certificate (mutual TLS); re-read when the file changes")
	flag.StringVar(&tlsFiles.Key, "tls-key", "", "the client certificate's key")
	flag.StringVar(&devPKI, "dev-pki", "detour-data/pki", "without --tls-*: use the agent certificate of the development PKI in this directory (made by the control plane)")
	flag.StringVar(&cfg.Region, "region", "", `this agent's region (required; "" explicitly: never fill, only redirect)`)
	flag.StringVar(&cfg.AgentID, "agent-id", hostname, "this agent's id in fill claims")
	flag.DurationVar(&cfg.RegisterInterval, "register-interval", 10*time.Second, "how often the agent reports itself to the control plane's fleet view (detourctl agents ls; negative: never)")
	flag.StringVar(&v2.RepoID, "repo-id", "", "identity of the origin's repository in content keys (default: the origin URL)")
	flag.DurationVar(&cfg.PlaceTimeout, "place-timeout", 50*time.Millisecond, "deadline of each Place call; past it the answer is inline")
	flag.IntVar(&cfg.LocationCacheEntries, "location-cache-entries", 100000, "redirects reused without asking the control plane (negative: no cache)")
	flag.DurationVar(&cfg.LocationCacheMaxAge, "location-cache-max-age", time.Minute, "longest a redirect is reused (the control plane may allow less)")
	flag.StringVar(&cacheable, "cacheable-commands", strings.Join(hgv2.DefaultCacheable, ","), "protocol-v2 commands whose responses may be redirected")
	flag.StringVar(&cfg.StoreEndpoint, "gcs-endpoint", "", "GCS API endpoint (an emulator); empty: STORAGE_EMULATOR_HOST or Google Cloud Storage with default credentials")
	flag.BoolVar(&cfg.NoFills, "no-fills", false, "never fill; only redirect to what other agents stored")
	flag.Int64Var(&cfg.FillQueueBytes, "fill-queue-bytes", 64<<20, "bytes one fill may fall behind the client before it is aborted")
	flag.Int64Var(&cfg.FillBytesTotal, "fill-bytes-total", 256<<20, "bytes all fills together may hold; past it new fills are declined")
	flag.IntVar(&cfg.MaxFills, "max-fills", 32, "fills running at once; past it new fills are declined")
	flag.Int64Var(&v2.MaxRequestBytes, "max-request-bytes", 0, "largest v2 command request body (default: the wire package's limit)")
	flag.DurationVar(&v2.CommandBodyTimeout, "command-body-timeout", 30*time.Second, "time a client has to send a command request body")
	flag.IntVar(&v2.BatchSize, "batch-size", 0, "recommendedbatchsize advertised for manifestdata and filesdata: 0 follows each repository's size (2^floor(log2(changesets/16)), 16 to 32768), a positive value fixes it, negative leaves the origin's")
	flag.DurationVar(&v2.SizeProbeTimeout, "size-probe-timeout", 10*time.Second, "how long the first handshake for a repository of unknown size waits while the origin is asked for its size (past it: the origin's batch sizes)")
	flag.Int64Var(&cfg.MaxBodyBytes, "max-body-bytes", 4<<30, "largest other request body relayed to the origin (a push)")
	flag.IntVar(&cfg.MaxConcurrentRequests, "max-concurrent-requests", 1024, "requests answered at once; past it HTTP 503")
	flag.IntVar(&cfg.MaxConnections, "max-connections", 4096, "open client connections; past it new ones wait")
	flag.DurationVar(&cfg.ReadHeaderTimeout, "read-header-timeout", 10*time.Second, "time a client has to send request headers")
	flag.DurationVar(&cfg.ReadTimeout, "read-timeout", 10*time.Minute, "time a client has to send a whole request")
	flag.DurationVar(&cfg.WriteTimeout, "write-timeout", 2*time.Hour, "time a response may take (10 GB at 1.5 MB/s fits the default)")
	flag.DurationVar(&cfg.IdleTimeout, "idle-timeout", 2*time.Minute, "how long an idle keep-alive connection stays open")
	flag.IntVar(&cfg.MaxHeaderBytes, "max-header-bytes", 64<<10, "largest request header")
	flag.DurationVar(&cfg.OriginAuthTTL, "origin-auth-ttl", 30*time.Second, "how long the origin's answer to an access check is reused per credentials and repository (a revoked credential keeps its redirects this long)")
	flag.DurationVar(&cfg.OriginAuthTimeout, "origin-auth-timeout", 5*time.Second, "deadline of an access check; past it the request goes to the origin as it is")
	flag.IntVar(&cfg.OriginAuthCacheSize, "origin-auth-cache-size", 10000, "access answers kept (least recently used go first)")
	flag.StringVar(&originAuthHeaders, "origin-auth-headers", "Authorization,Cookie", "comma-separated request headers the origin authenticates with; a check carries only these")
	flag.BoolVar(&noOriginAuth, "no-origin-auth", false, "never check clients' access with the origin (only for an origin that serves everyone)")
	flag.Float64Var(&cfg.CheckLocations, "check-locations", 0, "share (0..1) of redirects whose location is fetched in the background and reported if broken")
	flag.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	flag.DurationVar(&drain, "shutdown-timeout", 30*time.Second, "how long in-flight responses and fills may run after SIGTERM")
	flag.Parse()
	if err := envflag.Apply(flag.CommandLine, "DETOUR_"); err != nil {
		fail("%v", err)
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		fail("--log-level: %v", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	memlimit.Set(log, memlimit.FromCgroup)
	cfg.Log = log
	if !envflag.Given(flag.CommandLine, "region") {
		fail(`--region is required (--region "" for an agent that never fills)`)
	}
	if origin == "" {
		fail("--origin is required")
	}
	u, err := url.Parse(origin)
	if err != nil || u.Scheme == "" || u.Host == "" {
		fail("--origin %q is not an absolute URL", origin)
	}
	cfg.Origin = u
	v2.Cacheable = strings.Split(cacheable, ",")
	cfg.OriginAuthHeaders = strings.Split(originAuthHeaders, ",")
	if noOriginAuth {
		log.Warn("origin access checks are off (--no-origin-auth): any client that reaches the agent gets redirects to cached content")
	} else {
		cfg.Access = hgweb.AccessProbe(u, nil)
	}
	formats, err := checkBundleFlags(bundles.Step, bundleFormats)
	if err = flagcheck.All(flagcheck.Fraction("check-locations", cfg.CheckLocations), err); err != nil {
		fail("%v", err)
	}
	if cps != "" {
		cfg.ControlPlanes = strings.Split(cps, ",")
		switch {
		case insecureCP:
			log.Warn("talking to the control plane in plaintext (--insecure): anyone on the network can read and forge placements")
			cfg.Credentials = insecure.NewCredentials()
		case tlsFiles == (pki.Files{}):
			dev := pki.DevFiles(devPKI).Agent
			if _, err := os.Stat(dev.Key); err != nil {
				fail("--controlplane needs --tls-ca (and --tls-cert, --tls-key for mutual TLS), a development PKI in --dev-pki %s, or --insecure", devPKI)
			}
			log.Warn("no --tls-ca: using the development PKI's agent certificate", "dir", devPKI)
			tlsFiles = dev
			fallthrough
		default:
			creds, err := pki.ClientCredentials(tlsFiles)
			if err != nil {
				fail("control-plane TLS: %v", err)
			}
			defer creds.Close()
			cfg.Credentials = creds
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	a, err := agent.New(ctx, cfg)
	if err != nil {
		fail("%v", err)
	}
	var mounted []agent.Front
	for _, name := range strings.Split(fronts, ",") {
		switch strings.TrimSpace(name) {
		case "hgv2":
			f, err := hgv2.New(a, v2)
			if err != nil {
				fail("%v", err)
			}
			mounted = append(mounted, f)
		case "hgbundle":
			bundles.RepoID = v2.RepoID
			bundles.Formats = formats
			f, err := hgbundle.New(a, bundles)
			if err != nil {
				fail("%v", err)
			}
			mounted = append(mounted, f)
		case "":
		default:
			fail("--fronts: unknown front %q (known: hgv2, hgbundle)", name)
		}
	}
	a.Mount(mounted...)
	errc := make(chan error, 3)
	serve := func(name, addr string, fn func(net.Listener) error) {
		lis, err := net.Listen("tcp", addr)
		if err != nil {
			fail("--%s: %v", name, err)
		}
		go func() { errc <- fn(lis) }()
	}
	serve("listen", listen, a.Serve)
	if opsListen != "" {
		serve("metrics-listen", opsListen, a.ServeOps)
	}
	if pprofListen != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		serve("pprof-listen", pprofListen, func(l net.Listener) error { return a.ServeHandler(l, mux) })
	}
	log.Info("agent serving", "listen", listen, "origin", u.String(), "controlplane", cps, "region", cfg.Region,
		"agent_id", cfg.AgentID, "place_timeout", cfg.PlaceTimeout.String(), "fronts", fronts)
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
	if err := a.Shutdown(sctx); err != nil {
		log.Warn("shutdown cut short", "err", err)
	}
	log.Info("agent stopped")
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "agent: "+format+"\n", args...)
	os.Exit(2)
}
