package controlplane

import (
	"context"
	"errors"
	"fmt"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/detourhq/detour/internal/targets"
)

// toStatus maps registry errors to gRPC status codes; this is the only place that does.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	var ve *targets.ValidationError
	switch {
	case errors.As(err, &ve):
		return status.Errorf(codes.InvalidArgument, "%s: %s", ve.Field, ve.Msg)
	case errors.Is(err, targets.ErrNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, targets.ErrExists):
		return status.Error(codes.AlreadyExists, err.Error())
	case errors.Is(err, targets.ErrConflict), errors.Is(err, targets.ErrClaimNotHeld), errors.Is(err, targets.ErrNotHeartbeat):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, targets.ErrOutcomeUnknown):
		// etcd may have applied the write; every write compares revisions, so a retry is safe.
		return status.Errorf(codes.Unavailable, "etcd did not answer in time; the write may have committed, and retrying is safe: %v", err)
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	case isNoSpace(err):
		// etcd refuses every write once its NOSPACE alarm is raised; reads and Place go on.
		return status.Error(codes.ResourceExhausted, "etcd is out of space (NOSPACE alarm: its database reached the "+
			"space quota) and refuses writes until space is reclaimed and the alarm disarmed; see the etcd section "+
			"of docs/deploy.md")
	}
	if s, ok := status.FromError(err); ok && s.Code() != codes.Unknown {
		return status.Errorf(codes.Unavailable, "etcd: %s", s.Message())
	}
	return status.Error(codes.Unavailable, fmt.Sprintf("etcd unreachable: %v", err))
}

func invalidArg(field, format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, "%s: %s", field, fmt.Sprintf(format, args...))
}

// isNoSpace reports whether err is etcd refusing a write for its space quota.
func isNoSpace(err error) bool {
	return errors.Is(err, rpctypes.ErrNoSpace) || errors.Is(err, rpctypes.ErrGRPCNoSpace) ||
		rpctypes.ErrorDesc(err) == rpctypes.ErrorDesc(rpctypes.ErrGRPCNoSpace)
}
