package agent

import (
	"context"
	"errors"
	"log"
	"log/slog"
	"net"
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"
)

// Serve answers clients on lis until Shutdown, like http.Server.Serve (it returns
// http.ErrServerClosed then). The first call starts the agent's background work: the target
// watch and the control-plane health probe.
func (a *Agent) Serve(lis net.Listener) error {
	srv := &http.Server{Handler: a, ReadHeaderTimeout: a.cfg.ReadHeaderTimeout, ReadTimeout: a.cfg.ReadTimeout,
		WriteTimeout: a.cfg.WriteTimeout, IdleTimeout: a.cfg.IdleTimeout, MaxHeaderBytes: a.cfg.MaxHeaderBytes,
		ErrorLog: errorLog(a.log)}
	return a.serve(srv, netutil.LimitListener(lis, a.cfg.MaxConnections))
}

// ServeOps serves /metrics, /healthz (the process answers) and /readyz (the agent can redirect:
// a control plane answered and the target set is known; an agent without control planes is ready
// at once) on lis until Shutdown.
func (a *Agent) ServeOps(lis net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(a.metrics.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if why := a.notReady(); why != "" {
			http.Error(w, "not ready: "+why, http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: a.cfg.ReadHeaderTimeout, ReadTimeout: a.cfg.ReadHeaderTimeout,
		WriteTimeout: a.cfg.ReadTimeout, ErrorLog: errorLog(a.log)}
	return a.serve(srv, lis)
}

// Handler serves lis with h until Shutdown (pprof, say), with the agent's ops timeouts.
func (a *Agent) ServeHandler(lis net.Listener, h http.Handler) error {
	return a.serve(&http.Server{Handler: h, ReadHeaderTimeout: a.cfg.ReadHeaderTimeout, ErrorLog: errorLog(a.log)}, lis)
}

func (a *Agent) serve(srv *http.Server, lis net.Listener) error {
	a.mu.Lock()
	if a.shutdown.Load() {
		a.mu.Unlock()
		lis.Close()
		return http.ErrServerClosed
	}
	a.servers = append(a.servers, srv)
	a.mu.Unlock()
	a.start.Do(a.startBackground)
	return srv.Serve(lis)
}

func (a *Agent) notReady() string {
	switch {
	case a.shutdown.Load():
		return "shutting down"
	case a.placement == nil:
		return ""
	case a.cp.down.Load():
		return "the control plane does not answer"
	case a.targets.Load() == nil:
		return "the target set is not known yet"
	}
	return ""
}

func (a *Agent) startBackground() {
	if a.placement == nil {
		return
	}
	a.loops.Add(1)
	go func() { defer a.loops.Done(); a.watchTargets(a.bg) }()
	if a.cfg.RegisterInterval > 0 {
		a.loops.Add(1)
		go func() { defer a.loops.Done(); a.register(a.bg) }()
	}
}

// Shutdown stops the agent in order: readiness goes false, the listeners close and in-flight
// responses finish (until ctx ends, then their connections are cut), background fills commit and
// report (until ctx ends, then they are aborted and their claims released), and the background
// loops, the control-plane connection and the store client close.
func (a *Agent) Shutdown(ctx context.Context) error {
	a.mu.Lock()
	a.shutdown.Store(true)
	servers := a.servers
	a.mu.Unlock()
	var errs []error
	for _, srv := range servers {
		if err := srv.Shutdown(ctx); err != nil {
			_ = srv.Close()
			errs = append(errs, err)
		}
	}
	done := make(chan struct{})
	go func() { a.work.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		a.log.Warn("fills still running at shutdown are aborted; their claims are released")
		a.stopFill()
		<-done
		errs = append(errs, ctx.Err())
	}
	a.stopBg()
	a.loops.Wait()
	a.cp.stop()
	if a.conn != nil {
		_ = a.conn.Close()
	}
	if a.ownStore != nil {
		_ = a.ownStore.Close()
	}
	return errors.Join(errs...)
}

// errorLog sends net/http's own error lines (broken connections, TLS handshakes) to the agent's
// log at debug level: they are about single clients, not something an operator acts on.
func errorLog(l *slog.Logger) *log.Logger { return slog.NewLogLogger(l.Handler(), slog.LevelDebug) }
