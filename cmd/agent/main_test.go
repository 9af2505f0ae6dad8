package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/detourhq/detour/internal/testbed"
)

// An agent started without a region would never fill and say nothing; it must refuse to start,
// and plaintext to the control plane must be asked for. Values the agent cannot work with are
// refused at start (exit status 2), naming the flag.
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
		{[]string{"--region", "us", "--origin", "http://127.0.0.1:1/", "--check-locations", "NaN"}, "--check-locations: NaN"},
		{[]string{"--region", "us", "--origin", "http://127.0.0.1:1/", "--bundle-step", "-1"}, "--bundle-step: -1 is not between 0 and"},
		{[]string{"--region", "us", "--origin", "http://127.0.0.1:1/", "--bundle-step", "99999999"}, "--bundle-step: 99999999"},
		{[]string{"--region", "us", "--origin", "http://127.0.0.1:1/", "--bundle-formats", "zstd,brotli"}, `--bundle-formats: "brotli" is not one of`},
		{[]string{"--region", "us", "--origin", "http://127.0.0.1:1/", "--bundle-formats", "gzip,zstd,gzip"}, "--bundle-formats: gzip is listed twice"},
		// Checked even when the hgbundle front is off, before anything starts.
		{[]string{"--region", "us", "--origin", "http://127.0.0.1:1/", "--fronts", "hgv2", "--bundle-formats", ""}, `--bundle-formats: "" is not one of`},
	} {
		out, err := exec.Command(bin, c.args...).CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), c.says) {
			t.Errorf("agent %v: %v %q, want exit 2 saying %q", c.args, err, out, c.says)
		}
	}
}
