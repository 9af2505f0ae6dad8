package deploy

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// rootDir is the root module, whose sources say which metrics and flags exist.
const rootDir = ".."

// pendingMetrics are series the artefacts use before the code exports them: another change is
// adding them to the control plane. Each names its kind, so histograms get their suffixes.
// Remove an entry once the code has it (the test logs when it does).
var pendingMetrics = map[string]string{
	"detour_target_healthy":                  "Gauge",   // label target: 1 healthy, 0 not
	"detour_reconcile_missing_objects_total": "Counter", // label target: READY objects the store lacks
}

// prometheusSeries are made by Prometheus itself for every scrape target, not by Detour.
var prometheusSeries = []string{"up"}

// pendingFlags are flags the artefacts pass before the binaries define them: the TLS and
// authorization flags are being added to both binaries by another change. Remove an entry once
// cmd/<binary> has it (the test logs when it does).
var pendingFlags = map[string][]string{
	"controlplane": {"tls-cert", "tls-key", "client-ca", "authz-policy", "etcd-cacert", "etcd-cert", "etcd-key"},
	"agent":        {"tls-ca", "tls-cert", "tls-key"},
}

// goSources calls f with the contents of every non-test Go file under dir.
func goSources(t *testing.T, dir string, f func(path, src string)) {
	t.Helper()
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "testdata" {
			return fs.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		f(path, string(b))
		return nil
	})
	if err != nil {
		t.Fatalf("read Go sources under %s: %v", dir, err)
	}
}

var (
	// prometheus.CounterOpts{Name: "detour_x", ...}, HistogramOpts, GaugeOpts, SummaryOpts; the
	// kind is the word before Opts. [^{}] keeps the match inside one literal.
	optsName = regexp.MustCompile(`(\w+)Opts\{[^{}]*?\bName:\s*"(detour_[A-Za-z0-9_:]+)"`)
	// prometheus.NewDesc("detour_x", ...) for collectors written by hand.
	descName = regexp.MustCompile(`NewDesc\(\s*"(detour_[A-Za-z0-9_:]+)"`)
)

// seriesNames returns the series names a metric of this kind exports.
func seriesNames(kind, name string) []string {
	switch kind {
	case "Histogram":
		return []string{name + "_bucket", name + "_sum", name + "_count"}
	case "Summary":
		return []string{name, name + "_sum", name + "_count"}
	}
	return []string{name}
}

// exportedMetrics returns every series name Detour's code exports under internal/, the pending
// ones, and Prometheus's own.
func exportedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	fromCode := map[string]bool{}
	goSources(t, filepath.Join(rootDir, "internal"), func(_, src string) {
		for _, m := range optsName.FindAllStringSubmatch(src, -1) {
			for _, s := range seriesNames(m[1], m[2]) {
				fromCode[s] = true
			}
		}
		for _, m := range descName.FindAllStringSubmatch(src, -1) {
			fromCode[m[1]] = true
		}
	})
	// Guard against a scan that silently finds nothing (moved files, a changed idiom).
	for _, want := range []string{"detour_agent_requests_total", "detour_snapshot_age_seconds", "detour_place_duration_seconds_bucket"} {
		if !fromCode[want] {
			t.Fatalf("the scan of %s/internal found no %s: has the way metrics are declared changed?", rootDir, want)
		}
	}
	known := map[string]bool{}
	for name := range fromCode {
		known[name] = true
	}
	for name, kind := range pendingMetrics {
		if fromCode[name] {
			t.Logf("pending metric %s is now exported by the code: remove it from pendingMetrics", name)
		}
		for _, s := range seriesNames(kind, name) {
			known[s] = true
		}
	}
	for _, name := range prometheusSeries {
		known[name] = true
	}
	return known
}

// flagDef matches flag definitions: flag.StringVar(&x, "name", ...), fs.Duration("name", ...),
// flag.Func("name", ...), flag.Var(v, "name", ...).
var flagDef = regexp.MustCompile(`\.(?:\w*Var|String|Int|Int64|Uint|Uint64|Bool|Duration|Float64|Func|BoolFunc)\(\s*(?:[^,()"]+,\s*)?"([a-z][a-z0-9-]*)"`)

// binaryFlags returns the flags cmd/<binary> defines, plus the pending ones.
func binaryFlags(t *testing.T, binary string) map[string]bool {
	t.Helper()
	flags := map[string]bool{}
	goSources(t, filepath.Join(rootDir, "cmd", binary), func(_, src string) {
		for _, m := range flagDef.FindAllStringSubmatch(src, -1) {
			flags[m[1]] = true
		}
	})
	if !flags["listen"] || !flags["shutdown-timeout"] {
		t.Fatalf("the scan of cmd/%s found no --listen or --shutdown-timeout: has the way flags are declared changed?", binary)
	}
	for _, f := range pendingFlags[binary] {
		if flags[f] {
			t.Logf("pending flag --%s is now defined by cmd/%s: remove it from pendingFlags", f, binary)
		}
		flags[f] = true
	}
	return flags
}

// flagArgs splits "--name=value" and "--name" arguments into a map of name to value; other
// arguments (a flag's value given separately) are returned in rest.
func flagArgs(args []string) (flags map[string]string, rest []string) {
	flags = map[string]string{}
	for _, a := range args {
		if !strings.HasPrefix(a, "-") {
			rest = append(rest, a)
			continue
		}
		name, value, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		flags[name] = value
	}
	return flags, rest
}

// checkFlags reports every flag in args that binary does not define, and any argument not in
// --name=value form (the artefacts use only that form, so that each flag is one argument).
func checkFlags(t *testing.T, where, binary string, args []string, defined map[string]bool) map[string]string {
	t.Helper()
	flags, rest := flagArgs(args)
	if len(rest) > 0 {
		t.Errorf("%s: arguments %q are not in --name=value form", where, rest)
	}
	var unknown []string
	for name := range flags {
		if !defined[name] {
			unknown = append(unknown, name)
		}
	}
	slices.Sort(unknown)
	if len(unknown) > 0 {
		t.Errorf("%s: cmd/%s defines no flag %q", where, binary, unknown)
	}
	return flags
}
