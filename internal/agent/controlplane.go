package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"
)

// dialControlPlane connects to the control-plane replicas, balancing calls round-robin over those
// that are up. Reconnection uses gRPC's own backoff, capped at 1s so that a restarted replica is
// used again within a second; keepalives notice a replica that stopped answering.
func dialControlPlane(addrs []string, creds credentials.TransportCredentials) (*grpc.ClientConn, error) {
	if len(addrs) == 0 {
		return nil, errors.New("no control-plane addresses")
	}
	r := manual.NewBuilderWithScheme("detour-cp")
	state := resolver.State{}
	for _, a := range addrs {
		// Each replica's certificate is checked against its own host name, not the target's.
		host, _, err := net.SplitHostPort(a)
		if err != nil {
			return nil, fmt.Errorf("control-plane address %q: %w", a, err)
		}
		state.Addresses = append(state.Addresses, resolver.Address{Addr: a, ServerName: host})
	}
	r.InitialState(state)
	return grpc.NewClient(r.Scheme()+":///controlplane",
		grpc.WithResolvers(r),
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
		grpc.WithConnectParams(grpc.ConnectParams{MinConnectTimeout: time.Second,
			Backoff: backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second}}),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true}),
	)
}

// cpGate lets requests skip Place while the control plane is known not to answer, so that they go
// inline at once instead of each spending the place timeout, and notices the moment it answers
// again: while it is down, a probe (the gRPC health check, waiting for a ready connection) runs
// every probeInterval, and the first success reopens the gate.
type cpGate struct {
	health  healthpb.HealthClient
	down    atomic.Bool
	mu      sync.Mutex
	probing bool
	wg      sync.WaitGroup
	since   time.Time
}

const probeInterval = 100 * time.Millisecond

func (g *cpGate) init(conn *grpc.ClientConn) { g.health = healthpb.NewHealthClient(conn) }

// failed closes the gate after a Place that did not answer, and starts the probe.
func (a *Agent) placeFailed(err error) {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled, codes.ResourceExhausted, codes.Internal, codes.Unknown:
	default:
		return // the control plane answered (with an error about this request)
	}
	g := &a.cp
	if !g.down.CompareAndSwap(false, true) {
		return
	}
	a.metrics.cpUp.Set(0)
	a.once.Warn("place", "control plane did not answer; serving inline until it does", "cause", status.Code(err).String(), "err", err)
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.probing || a.bg.Err() != nil {
		return
	}
	g.probing, g.since = true, time.Now()
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		a.probeControlPlane()
	}()
}

func (a *Agent) probeControlPlane() {
	g := &a.cp
	t := time.NewTicker(probeInterval)
	defer t.Stop()
	for {
		ctx, cancel := context.WithTimeout(a.bg, 4*probeInterval)
		resp, err := g.health.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		cancel()
		if err == nil && resp.Status == healthpb.HealthCheckResponse_SERVING {
			g.mu.Lock()
			g.probing = false
			down := time.Since(g.since)
			g.mu.Unlock()
			g.down.Store(false)
			a.metrics.cpUp.Set(1)
			a.once.Recovered("place", "control plane answering again", "after", fmt.Sprint(down.Round(time.Millisecond)))
			return
		}
		select {
		case <-a.bg.Done():
			g.mu.Lock()
			g.probing = false
			g.mu.Unlock()
			return
		case <-t.C:
		}
	}
}

func (g *cpGate) stop() { g.wg.Wait() }
