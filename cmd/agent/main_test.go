package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/detourhq/detour/internal/testbed"
)

// An agent started without a region would never fill and say nothing; it must refuse to start,
// and plaintext to the control plane must be asked for.
func TestMisconfigurationIsRefusedAtStart(t *testing.T) {
	bin := filepath.Join(testbed.Binaries(t), "agent")
	for _, c := range []struct {
		args []string
		says string
	}{
		{[]string{"--origin", "http://127.0.0.1:1/"}, "--region is required"},
		{[]string{"--region", "us"}, "--origin is required"},
		{[]string{"--region", "us", "--origin", "not a url"}, "not an absolute URL"},
		{[]string{"--region", "us", "--origin", "http://127.0.0.1:1/", "--check-locations", "2"}, "--check-locations"},
	} {
		out, err := exec.Command(bin, c.args...).CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), c.says) {
			t.Errorf("agent %v: %v %q, want exit 2 saying %q", c.args, err, out, c.says)
		}
	}
}
