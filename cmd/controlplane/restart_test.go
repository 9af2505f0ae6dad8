package main

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/testbed"
)

// A control plane on its embedded etcd that is stopped with SIGTERM marks its checkpoint as what
// that etcd holds, and its next start serves it while the etcd restarts (taking the marker); one
// killed leaves no marker, and the start after it serves a walk of etcd's database file instead,
// then resumes from it.
func TestASignalledStopIsCleanAndAKilledOneIsNot(t *testing.T) {
	cp := testbed.StartControlPlane(t)
	marker := filepath.Join(cp.DataDir, "etcd.clean-stop")
	const served = "serving the index of the last clean stop"
	if err := cp.Stop(30 * time.Second); err != nil {
		t.Fatalf("stop: %v\n%s", err, cp.Output())
	}
	if _, err := os.Stat(marker); err != nil {
		t.Fatalf("no clean-stop marker after SIGTERM: %v\n%s", err, cp.Output())
	}
	cp.Restart()
	cp.WaitServing(t, 60*time.Second)
	if n := strings.Count(cp.Output(), served); n != 1 {
		t.Fatalf("the start after a clean stop said %q %d times, want once:\n%s", served, n, cp.Output())
	}
	if _, err := os.Stat(marker); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the marker is still there once the next start serves: %v", err)
	}
	cp.Kill()
	if _, err := os.Stat(marker); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a killed control plane left a marker: %v", err)
	}
	cp.Restart()
	cp.WaitServing(t, 60*time.Second)
	if n := strings.Count(cp.Output(), served); n != 1 {
		t.Fatalf("the start after a kill served a clean stop (%d in all):\n%s", n, cp.Output())
	}
	for _, said := range []string{"serving the index in the embedded etcd's database file", "snapshot resumed from the embedded etcd's database file"} {
		if n := strings.Count(cp.Output(), said); n != 1 {
			t.Fatalf("the start after a kill said %q %d times, want once:\n%s", said, n, cp.Output())
		}
	}
}
