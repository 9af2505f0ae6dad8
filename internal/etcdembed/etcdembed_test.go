package etcdembed

import (
	"context"
	"net"
	"testing"
)

// TestStartPicksOtherPortsWhenOneIsTaken: a port picked by Start and taken by someone else before
// etcd binds it is not a failed start. The test takes every port FreeURL hands out first, once.
func TestStartPicksOtherPortsWhenOneIsTaken(t *testing.T) {
	taken := 0
	freeURL = func() (string, error) {
		u, err := freeLoopbackURL()
		if err != nil || taken > 0 {
			return u, err
		}
		taken++
		l, err := net.Listen("tcp", u[len("http://"):])
		if err != nil {
			return "", err
		}
		t.Cleanup(func() { l.Close() })
		return u, nil
	}
	t.Cleanup(func() { freeURL = freeLoopbackURL })
	s, err := Start(context.Background(), Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if taken != 1 {
		t.Fatalf("the test took %d ports, want 1", taken)
	}
}
