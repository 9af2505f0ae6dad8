package devstack

import (
	"context"
	"fmt"

	"github.com/detourhq/detour/internal/controlplane"
)

// ControlPlane is a control plane served in this process (the dev stack, benchmarks, tests): a
// controlplane.Server on the addresses of its options, served in the background.
type ControlPlane struct {
	*controlplane.Server
	ls     controlplane.Listeners
	served chan error    // what Serve returned
	done   chan struct{} // closed when Serve has returned
}

// StartControlPlane builds a control plane from o, serves o's addresses in the background, and
// returns once the control plane has loaded its snapshot; it gives up when ctx ends first (a
// caller's choice, not a limit of the control plane's).
func StartControlPlane(ctx context.Context, o controlplane.Options) (*ControlPlane, error) {
	srv, err := controlplane.New(ctx, o)
	if err != nil {
		return nil, err
	}
	ls, err := srv.Listen()
	if err != nil {
		srv.Shutdown(ctx)
		return nil, err
	}
	c := &ControlPlane{Server: srv, ls: ls, served: make(chan error, 1), done: make(chan struct{})}
	go func() {
		c.served <- srv.Serve(ls)
		close(c.done)
	}()
	select {
	case <-srv.Ready():
		return c, nil
	case <-c.done:
		err = <-c.served
	case <-ctx.Done():
		err = fmt.Errorf("waiting for the control plane's snapshot: %w", ctx.Err())
	}
	c.Shutdown(context.WithoutCancel(ctx))
	return nil, err
}

// Addr is the gRPC address (PlacementService, and AdminService unless it has its own).
func (c *ControlPlane) Addr() string { return c.ls.Placement.Addr().String() }

// MetricsAddr is the metrics address ("" without one).
func (c *ControlPlane) MetricsAddr() string {
	if c.ls.Metrics == nil {
		return ""
	}
	return c.ls.Metrics.Addr().String()
}

// Err delivers what Serve returned if it stops on its own (a listener failed).
func (c *ControlPlane) Err() <-chan error { return c.served }

// Shutdown shuts the control plane down and waits until Serve has returned.
func (c *ControlPlane) Shutdown(ctx context.Context) error {
	err := c.Server.Shutdown(ctx)
	<-c.done
	return err
}
