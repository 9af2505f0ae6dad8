package main

import (
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/testbed"
)

// Values the control plane cannot work with are refused at start, naming the flag, before
// anything is started (exit status 2).
func TestBadFlagsAreRefusedAtStart(t *testing.T) {
	bin := filepath.Join(testbed.Binaries(t), "controlplane")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--verify-fills", "NaN"}, "--verify-fills"},
		{[]string{"--copy-rate", "NaN"}, "--copy-rate: NaN"},
		{[]string{"--claim-rate", "NaN"}, "--claim-rate: NaN"},
		{[]string{"--claim-rate", "0.000001"}, "--claim-rate: 1e-06 per second is below 1"},
		{[]string{"--probe-interval", "1ns"}, "--probe-interval: 1ns is not between 100ms"},
		{[]string{"--hot-keys", "9999999999"}, "--hot-keys"},
		{[]string{"--probe-failures", "99999999999999999999"}, "probe-failures"}, // past int64: the flag package
		{[]string{"--embedded-etcd-quota", "1"}, "--embedded-etcd-quota: 1 is not between"},
		{[]string{"--compact-interval", "1ms"}, "--compact-interval"},
		{[]string{"--gc-percent", "5"}, "--gc-percent: 5 is not between"},
		{[]string{"--gc-percent", "-1"}, "--gc-percent"},
		{[]string{"--reconcile-max-retire-share", "0"}, "--reconcile-max-retire-share: 0 is not a share above 0"},
		{[]string{"--reconcile-max-retire-share", "1.5"}, "--reconcile-max-retire-share: 1.5 is not a fraction"},
		{[]string{"--reconcile-max-retire-share", "NaN"}, "--reconcile-max-retire-share: NaN"},
		{[]string{"--gcs-endpoint", "http://127.0.0.1:4443/bucket/"}, "--gcs-endpoint"},
		{[]string{"--gcs-endpoint", "http://user:pw@127.0.0.1:4443/"}, "--gcs-endpoint: credentials"},
	} {
		cmd := exec.Command(bin, append([]string{"--data-dir", t.TempDir(), "--listen", "127.0.0.1:0", "--metrics-listen", ""}, c.args...)...)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), c.want) {
			t.Errorf("%v: %v, want exit 2 naming %q:\n%s", c.args, err, c.want, out)
		}
	}
}

// Once serving, the collector runs at --gc-percent (the process then grows to about 1.5 times its
// live heap between collections, not twice); a GOGC variable wins over the flag.
func TestTheCollectorTargetIsSetOnceServing(t *testing.T) {
	gogc := func(cp *testbed.ControlPlane) float64 {
		return testbed.Metric(t, "http://"+cp.MetricsAddr+"/metrics", "go_gc_gogc_percent")
	}
	cp := testbed.StartControlPlane(t, "--gc-percent", "40")
	testbed.Eventually(t, 10*time.Second, "the collector at --gc-percent 40", func() bool { return gogc(cp) == 40 })
	def := testbed.StartControlPlane(t)
	testbed.Eventually(t, 10*time.Second, "the collector at the default 50", func() bool { return gogc(def) == 50 })
	t.Setenv("GOGC", "80")
	env := testbed.StartControlPlane(t, "--gc-percent", "40")
	time.Sleep(time.Second) // past the switch it would make
	if got := gogc(env); got != 80 || !strings.Contains(env.Output(), "GOGC is set") {
		t.Fatalf("with GOGC=80 and --gc-percent 40 the collector runs at %v:\n%s", got, env.Output())
	}
}
