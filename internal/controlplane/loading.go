package controlplane

import (
	"context"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// While a replica loads its first snapshot it serves already, whatever the snapshot's size, so
// that no size can keep it from starting: Place answers INLINE at once (reason "loading", agents
// stay fail-open), and the calls that would answer from the snapshot are refused with Unavailable
// and the load's progress. AbortFill, Heartbeat and RegisterAgent read no snapshot and are served.

// loading reports whether the first snapshot is still loading.
func (d *deps) loading() bool {
	select {
	case <-d.w.Ready():
		return false
	default:
		return true
	}
}

// needsSnapshot reports whether method answers from the snapshot (Place excepted: it answers
// inline while loading).
func needsSnapshot(method string) bool {
	switch method {
	case pb.PlacementService_ReportFill_FullMethodName, pb.PlacementService_ReportBrokenLocation_FullMethodName,
		pb.PlacementService_WatchTargets_FullMethodName:
		return true
	}
	return strings.HasPrefix(method, "/"+pb.AdminService_ServiceDesc.ServiceName+"/")
}

// loadingErr is the Unavailable answer to method while the snapshot loads, or nil. While a clean
// stop's index is served (etcd still starting), the calls that write to etcd are refused at once
// too, rather than after their write timeout.
func (d *deps) loadingErr(method string) error {
	if !d.loading() {
		return nil
	}
	if d.w.Snapshot().Provisional() && method != pb.PlacementService_Place_FullMethodName &&
		strings.HasPrefix(method, "/"+pb.PlacementService_ServiceDesc.ServiceName+"/") {
		return status.Error(codes.Unavailable, "etcd is starting (this replica serves redirects from its last clean stop meanwhile); try again shortly or ask another replica")
	}
	if !needsSnapshot(method) {
		return nil
	}
	return status.Errorf(codes.Unavailable, "loading the snapshot (%d records so far); try again shortly or ask another replica",
		d.w.LoadProgress())
}

func (d *deps) gateUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := d.loadingErr(info.FullMethod); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

func (d *deps) gateStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if err := d.loadingErr(info.FullMethod); err != nil {
		return err
	}
	return h(srv, ss)
}
