package deploy

import (
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// rootDir is the root module, whose sources say which metrics and flags exist.
const rootDir = ".."

// pendingMetrics are metrics the artefacts use before the code exports them: another change is
// adding them to the control plane. Remove an entry once the code has it (the test logs when it
// does).
var pendingMetrics = map[string]metric{
	"detour_target_healthy":                  {kind: "Gauge", labels: []string{"target"}},   // 1 healthy, 0 not
	"detour_reconcile_missing_objects_total": {kind: "Counter", labels: []string{"target"}}, // READY objects the store lacks
}

// prometheusSeries are made by Prometheus itself for every scrape target, not by Detour.
var prometheusSeries = []string{"up"}

// targetLabels are the labels Prometheus attaches to every series it scrapes (job and instance)
// and those the Prometheus Operator adds from Kubernetes.
var targetLabels = []string{"job", "instance", "namespace", "pod", "service", "endpoint", "container"}

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
	dir, err := filepath.EvalSymlinks(dir) // WalkDir does not enter a symlinked root
	if err != nil {
		t.Fatalf("read Go sources under %s: %v", dir, err)
	}
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
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

// metric is one metric as the code declares it.
type metric struct {
	kind   string   // Counter, Gauge, Histogram, Summary (the word before Opts), or "" if unknown
	labels []string // its variable labels
}

var (
	// prometheus.CounterOpts{Name: "detour_x", ...} and its kin, and the label names of a *Vec
	// that follow it: prometheus.NewCounterVec(prometheus.CounterOpts{...}, []string{"a", "b"}).
	// [^{}] keeps a match inside one literal.
	optsLiteral = regexp.MustCompile(`(\w+)Opts\{([^{}]*)\}(?:\s*,\s*\[\]string\{([^{}]*)\})?`)
	optsName    = regexp.MustCompile(`\bName:\s*"(detour_[A-Za-z0-9_:]+)"`)
	// prometheus.NewDesc("detour_x", "help", []string{"a"}, ...) for collectors written by hand.
	descLiteral = regexp.MustCompile(`NewDesc\(\s*"(detour_[A-Za-z0-9_:]+)",\s*"(?:[^"\\]|\\.)*",\s*(?:\[\]string\{([^{}]*)\})?`)
	quoted      = regexp.MustCompile(`"([^"]+)"`)
)

// series returns the series a metric exports, each with its label names.
func (m metric) series(name string) map[string][]string {
	switch m.kind {
	case "Histogram":
		return map[string][]string{name + "_bucket": append(slices.Clone(m.labels), "le"),
			name + "_sum": m.labels, name + "_count": m.labels}
	case "Summary":
		return map[string][]string{name: append(slices.Clone(m.labels), "quantile"),
			name + "_sum": m.labels, name + "_count": m.labels}
	}
	return map[string][]string{name: m.labels}
}

func quotedStrings(s string) []string {
	var out []string
	for _, m := range quoted.FindAllStringSubmatch(s, -1) {
		out = append(out, m[1])
	}
	return out
}

// knownSeries maps every series name Detour's code exports under internal/ (and the pending
// ones, and Prometheus's own) to the label names it may carry.
type knownSeries map[string]map[string]bool

func exportedMetrics(t *testing.T) knownSeries {
	t.Helper()
	fromCode := map[string]metric{}
	goSources(t, filepath.Join(rootDir, "internal"), func(_, src string) {
		for _, m := range optsLiteral.FindAllStringSubmatch(src, -1) {
			if n := optsName.FindStringSubmatch(m[2]); n != nil {
				fromCode[n[1]] = metric{kind: m[1], labels: quotedStrings(m[3])}
			}
		}
		for _, m := range descLiteral.FindAllStringSubmatch(src, -1) {
			fromCode[m[1]] = metric{labels: quotedStrings(m[2])}
		}
	})
	// Guard against a scan that silently finds nothing (moved files, a changed idiom).
	for name, kind := range map[string]string{"detour_agent_requests_total": "Counter",
		"detour_snapshot_age_seconds": "Gauge", "detour_place_duration_seconds": "Histogram"} {
		if fromCode[name].kind != kind {
			t.Fatalf("the scan of %s/internal found no %s %s: has the way metrics are declared changed?", rootDir, kind, name)
		}
	}
	if l := fromCode["detour_agent_requests_total"].labels; !slices.Equal(l, []string{"outcome"}) {
		t.Fatalf("the scan found labels %q on detour_agent_requests_total, want [outcome]", l)
	}
	all := maps.Clone(fromCode)
	for name, m := range pendingMetrics {
		if _, ok := fromCode[name]; ok {
			t.Logf("pending metric %s is now exported by the code: remove it from pendingMetrics", name)
			continue
		}
		all[name] = m
	}
	for _, name := range prometheusSeries {
		all[name] = metric{}
	}
	known := knownSeries{}
	for name, m := range all {
		for s, lbls := range m.series(name) {
			known[s] = map[string]bool{}
			for _, l := range slices.Concat(lbls, targetLabels) {
				known[s][l] = true
			}
		}
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
