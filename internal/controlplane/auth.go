package controlplane

import (
	"context"
	_ "embed"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/authz"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/detourhq/detour/internal/pki"
)

// DefaultAuthzPolicy is the authorization policy used without --authz-policy: agents call
// PlacementService (but Heartbeat), mirrors Heartbeat, operators AdminService and reflection,
// read-only operators AdminService's Get, List and Explain methods; anyone the health service.
// Roles come from the URI SAN of the peer's certificate (spiffe://detour/<role>/<name>).
//
//go:embed authz-policy.json
var DefaultAuthzPolicy string

// authorizer is the gRPC authorization engine's interceptors (a static policy or a watched file).
type authorizer interface {
	UnaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error)
	StreamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error
}

// newAuthorizer loads the policy: the file, re-read every refresh, or the default.
func newAuthorizer(file string, refresh time.Duration) (authorizer, func(), error) {
	if file == "" {
		a, err := authz.NewStatic(DefaultAuthzPolicy)
		if err != nil {
			return nil, nil, fmt.Errorf("default authorization policy: %w", err)
		}
		return a, func() {}, nil
	}
	a, err := authz.NewFileWatcher(file, refresh)
	if err != nil {
		return nil, nil, fmt.Errorf("authorization policy %s: %w", file, err)
	}
	return a, a.Close, nil
}

// isHealth reports whether method is the health service's, which anyone may call (load balancers
// and orchestrators probe without client certificates).
func isHealth(method string) bool { return strings.HasPrefix(method, "/grpc.health.v1.Health/") }

// authn requires a verified client certificate on every RPC but health checks, then hands the
// RPC to the authorization policy. Rejections are counted by reason.
type authn struct {
	policy  authorizer
	metrics *Metrics
	log     *slog.Logger
}

func (a *authn) check(ctx context.Context, method string) error {
	if isHealth(method) {
		return nil
	}
	if id, _ := pki.Peer(ctx); id == "" {
		a.metrics.rejections.WithLabelValues("no_client_certificate").Inc()
		return status.Error(codes.Unauthenticated, "a client certificate issued by the control plane's client CA is required")
	}
	return nil
}

func (a *authn) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := a.check(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	resp, err := a.policy.UnaryInterceptor(ctx, req, info, h)
	a.countDenied(ctx, info.FullMethod, err)
	return resp, err
}

func (a *authn) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if err := a.check(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	err := a.policy.StreamInterceptor(srv, ss, info, h)
	a.countDenied(ss.Context(), info.FullMethod, err)
	return err
}

// countDenied counts the policy's denials (a handler's own PermissionDenied is counted where it
// is made).
func (a *authn) countDenied(ctx context.Context, method string, err error) {
	if s, ok := status.FromError(err); ok && s.Code() == codes.PermissionDenied && strings.HasPrefix(s.Message(), "authz: ") {
		a.metrics.rejections.WithLabelValues("policy").Inc()
		id, _ := pki.Peer(ctx)
		a.log.Debug("RPC denied by the authorization policy", "method", method, "peer", id)
	}
}

// callerID is the authenticated identity of the RPC's peer ("" on a plaintext connection).
func callerID(ctx context.Context) string {
	id, _ := pki.Peer(ctx)
	return id
}

// claimLimiter bounds how fast each agent may take fill claims (etcd writes), so that a broken or
// hostile agent cannot flood etcd through Place. Limiters are kept per agent identity; the map is
// reset when it grows past maxAgents (a flood of identities gets a fresh bucket each, which the
// authorization policy bounds to agents with certificates).
type claimLimiter struct {
	rate  rate.Limit
	burst int
	mu    sync.Mutex
	m     map[string]*rate.Limiter
}

const maxAgents = 10000

func (l *claimLimiter) allow(agent string, now time.Time) bool {
	if l.rate <= 0 {
		return true
	}
	l.mu.Lock()
	lim, ok := l.m[agent]
	if !ok {
		if len(l.m) >= maxAgents || l.m == nil {
			l.m = map[string]*rate.Limiter{}
		}
		lim = rate.NewLimiter(l.rate, l.burst)
		l.m[agent] = lim
	}
	l.mu.Unlock()
	return lim.AllowN(now, 1)
}
