package controlplane

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/detourhq/detour/internal/targets"
)

// A write that etcd did not confirm in time may have happened: the error must not say otherwise.
func TestUnknownOutcomeIsReportedAsUnknown(t *testing.T) {
	t.Parallel()
	err := toStatus(fmt.Errorf("claim k: %w: %w", targets.ErrOutcomeUnknown, context.DeadlineExceeded))
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "may have committed") {
		t.Fatalf("got %v", err)
	}
}

// A write etcd refused for its space quota is ResourceExhausted and says so, not "unreachable".
func TestNoSpaceIsResourceExhausted(t *testing.T) {
	err := toStatus(fmt.Errorf("set policy: %w", rpctypes.ErrNoSpace))
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "NOSPACE") || strings.Contains(err.Error(), "unreachable") {
		t.Fatalf("got %v", err)
	}
}
