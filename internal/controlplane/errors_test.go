package controlplane

import (
	"context"
	"fmt"
	"strings"
	"testing"

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
