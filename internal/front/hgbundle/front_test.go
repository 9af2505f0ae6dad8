package hgbundle_test

// The clone-bundle front end to end, in one process: a real `hg serve` 6.3.2 behind a
// byte-counting proxy as the origin, the whole Detour system (control plane on an embedded etcd,
// the GCS emulator through the real storage client, the agent core with its fronts), and the real
// 6.3.2 and 5.6.1 clients cloning through the agent over protocol v1.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/front/hgbundle"
	"github.com/detourhq/detour/internal/hgserve"
	"github.com/detourhq/detour/internal/testbed"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// stackLog is the stack's log: DETOUR_TEST_LOG=1 shows it.
func stackLog() *slog.Logger {
	if os.Getenv("DETOUR_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return quiet
}

// bundleStack is Detour in front of an origin.
type bundleStack struct {
	*devstack.Stack
	origin *origin
	proxy  *proxy // between the agent (and direct clients) and hg serve
}

func startBundleStack(t *testing.T) *bundleStack {
	t.Helper()
	o := newOrigin(t)
	p := newProxy(t, o.server.URL)
	s, err := devstack.Start(context.Background(), devstack.Options{DataDir: t.TempDir(), OriginURL: p.URL + "/",
		RepoID: "bundle-e2e", PlaceTimeout: 2 * time.Second, FaultFront: true, Log: stackLog()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Close(ctx)
	})
	return &bundleStack{Stack: s, origin: o, proxy: p}
}

// metric sums the agent's series of name whose label has value (label "": every series).
func (s *bundleStack) metric(t *testing.T, name, label, value string) float64 {
	t.Helper()
	return testbed.MetricSum(t, s.Agent.Metrics().Registry, name, testbed.Label(label, value))
}

// waitStored waits until the agent has stored n bundles of each format, and they are verified
// READY.
func (s *bundleStack) waitStored(t *testing.T, n int) {
	t.Helper()
	testbed.Eventually(t, 30*time.Second, "bundles stored and reported", func() bool {
		return s.metric(t, "detour_agent_bundle_fills_total", "format", "zstd") >= float64(n) &&
			s.metric(t, "detour_agent_bundle_fills_total", "format", "gzip") >= float64(n) &&
			s.metric(t, "detour_agent_fills_total", "outcome", "ready") >= float64(2*n)
	})
	if failed := s.metric(t, "detour_agent_bundle_fills_total", "outcome", "failed"); failed != 0 {
		t.Fatalf("%v bundle fills failed", failed)
	}
}

// manifest asks the agent for the manifest as a client with zstd would.
func (s *bundleStack) manifest(t *testing.T) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, s.AgentURL+"?cmd=clonebundles", nil)
	req.Header.Set("X-HgProto-1", "0.1 0.2 comp=zstd,zlib,none")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("clonebundles: HTTP %d %s", resp.StatusCode, b)
	}
	return string(b)
}

// clone clones through the agent with hg and returns its output and the origin's bytes.
func (s *bundleStack) clone(t *testing.T, hg string, dir string) (string, int64) {
	t.Helper()
	s.proxy.originBytes.Store(0)
	out, err := hgOut(t, hg, t.TempDir(), "clone", "--noupdate", "--verbose", s.AgentURL, dir)
	if err != nil {
		t.Fatalf("clone through the agent: %v\n%s", err, out)
	}
	return out, s.proxy.originBytes.Load()
}

// sameContent is a clone's state without what only its local revision numbers decide: a bundle
// covers the ancestors of its checkpoint and the pull after it adds the rest, so changesets on other
// branches can take other local numbers than on the origin (as with Mercurial's own clone
// bundles), and with them the "tip" pseudo-tag. Changesets, phases, branches, tags and bookmarks
// are the same.
func sameContent(state string) string {
	lines := strings.Split(strings.TrimSpace(state), "\n")
	for i, l := range lines {
		head, rest, _ := strings.Cut(l, " tags:")
		tags, bookmarks, _ := strings.Cut(rest, " bookmarks:")
		kept := slices.DeleteFunc(strings.Fields(tags), func(t string) bool { return t == "tip" })
		lines[i] = head + " tags:" + strings.Join(kept, " ") + " bookmarks:" + bookmarks
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

// bundleSize is the length of the bundle at url.
func bundleSize(t *testing.T, url string) int64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: HTTP %d, %d bytes, %v", url, resp.StatusCode, n, err)
	}
	return n
}

// appliedBundle is the URL of the clone bundle a clone's verbose output says it applied.
func appliedBundle(t *testing.T, out string) string {
	t.Helper()
	_, rest, ok := strings.Cut(out, "applying clone bundle from ")
	if !ok {
		t.Fatalf("no clone bundle applied:\n%s", out)
	}
	url, _, _ := strings.Cut(rest, "\n")
	return url
}

// A repository that grows, cloned through Detour by stock clients with no configuration on the
// origin: the first clone is normal and makes bundles, later ones apply a Detour-made, verified
// bundle from the store and pull only what came after it; a new bundle is made once the
// repository has moved past the step; a store that is down is no longer advertised, and clones
// go on normally.
func TestStockClientsApplyDetourMadeBundles(t *testing.T) {
	s := startBundleStack(t)
	hg := s.origin.hg

	s.proxy.originBytes.Store(0)
	want := sameContent(directClone(t, hg, s.proxy.URL))
	direct := s.proxy.originBytes.Load()

	// Cold: nothing to advertise yet; the clone is normal and the bundles get made.
	out, _ := s.clone(t, hg, filepath.Join(t.TempDir(), "cold"))
	if !strings.Contains(out, "no clone bundles available") {
		t.Fatalf("the cold clone was offered a bundle:\n%s", out)
	}
	s.waitStored(t, 1)
	// Both formats from one fetch of the bundle: the fill costs the origin about one clone.
	if fetched := s.proxy.fillBytes.Load(); fetched > direct*11/10 {
		t.Fatalf("the bundles' fill fetched %d bytes from the origin, over 1.1 times a clone's %d", fetched, direct)
	}

	// Warm: the bundle comes from the store; the origin sends next to nothing.
	dir := filepath.Join(t.TempDir(), "warm")
	out, originBytes := s.clone(t, hg, dir)
	bucketURL := s.GCS.PublicURL("detour-demo")
	if s.Front != nil {
		bucketURL = s.Front.PublicURL("detour-demo")
	}
	if !strings.HasPrefix(appliedBundle(t, out), bucketURL) || !strings.Contains(out, "finished applying clone bundle") {
		t.Fatalf("the warm clone did not apply a bundle from the store (%s):\n%s", bucketURL, out)
	}
	if got := sameContent(state(t, hg, dir)); got != want {
		t.Fatalf("the warm clone differs from a direct clone\n got:\n%s\nwant:\n%s", got, want)
	}
	if originBytes*50 > direct {
		t.Fatalf("a warm clone cost the origin %d bytes, over 2%% of a direct clone's %d", originBytes, direct)
	}
	t.Logf("origin bytes: direct clone %d, warm clone through Detour %d (%.2f%%)", direct, originBytes, 100*float64(originBytes)/float64(direct))
	// The offload counts: the bundle the client applied, from the store; the rest from the origin.
	if got, want := s.metric(t, "detour_agent_response_bytes_total", "source", "store"), float64(bundleSize(t, appliedBundle(t, out))); got != want {
		t.Fatalf("store bytes counted: %v, want the applied bundle's %v", got, want)
	}
	if got := s.metric(t, "detour_agent_response_bytes_total", "source", "origin"); got == 0 {
		t.Fatal("no origin bytes counted for the clones' other commands")
	}

	// A new changeset: the clone applies the bundle it has and pulls the one changeset; the new
	// checkpoint's bundle gets made.
	first := appliedBundle(t, out)
	s.origin.commit(t, 1, "grown")
	want = sameContent(directClone(t, hg, s.proxy.URL))
	dir = filepath.Join(t.TempDir(), "grown")
	out, originBytes = s.clone(t, hg, dir)
	if appliedBundle(t, out) != first {
		t.Fatalf("after a new changeset: not the bundle made before it:\n%s", out)
	}
	if got := sameContent(state(t, hg, dir)); got != want {
		t.Fatalf("the clone after a new changeset differs from a direct clone\n got:\n%s\nwant:\n%s", got, want)
	}
	if originBytes*50 > direct {
		t.Fatalf("a clone after one new changeset cost the origin %d bytes, over 2%% of a direct clone's %d", originBytes, direct)
	}
	s.waitStored(t, 2)
	dir = filepath.Join(t.TempDir(), "renewed")
	out, _ = s.clone(t, hg, dir)
	if renewed := appliedBundle(t, out); renewed == first {
		t.Fatalf("the renewed bundle was not applied:\n%s", out)
	}
	if got := sameContent(state(t, hg, dir)); got != want {
		t.Fatalf("the clone from the renewed bundle differs from a direct clone\n%s\n got:\n%s\nwant:\n%s", out, got, want)
	}

	// Mercurial 5.6.1 over protocol v1, without zstd: it is offered the gzip bundle only.
	old := hg5(t)
	dir = filepath.Join(t.TempDir(), "old")
	out, _ = s.clone(t, old, dir)
	if !strings.Contains(out, "applying clone bundle from ") {
		t.Fatalf("5.6.1 did not apply a bundle:\n%s", out)
	}
	if got := sameContent(state(t, hg, dir)); got != want {
		t.Fatalf("5.6.1's clone differs from a direct clone")
	}

	// A push of many more changesets than a step: the newest bundles are not made yet, and the
	// clone still applies the newest READY one and pulls the rest.
	s.origin.commit(t, 20, "burst")
	want = sameContent(directClone(t, hg, s.proxy.URL))
	dir = filepath.Join(t.TempDir(), "burst")
	out, originBytes = s.clone(t, hg, dir)
	appliedBundle(t, out)
	if got := sameContent(state(t, hg, dir)); got != want {
		t.Fatalf("the clone after a push of 20 changesets differs from a direct clone")
	}
	if originBytes*20 > direct {
		t.Fatalf("a clone right after a push of 20 changesets cost the origin %d bytes, over 5%% of a direct clone's %d", originBytes, direct)
	}

	// The store's client-facing URL fails: the target is no longer advertised, nor its bundles,
	// within the prober's detection time; clones are normal.
	s.Front.Fail(http.StatusServiceUnavailable)
	testbed.Eventually(t, 20*time.Second, "an empty manifest while the store is down", func() bool {
		return strings.TrimSpace(s.manifest(t)) == ""
	})
	dir = filepath.Join(t.TempDir(), "store-down")
	out, _ = s.clone(t, hg, dir)
	if strings.Contains(out, "applying clone bundle") {
		t.Fatalf("a bundle was applied while the store is down:\n%s", out)
	}
	if got := sameContent(state(t, hg, dir)); got != want {
		t.Fatalf("the clone while the store is down differs from a direct clone")
	}
}

// The count of changesets the checkpoints are cut from is exact on a repository where a number
// past its end is also a prefix of one of its changesets' hashes (the origin resolves "9" as the
// changeset 9dd83e44… when there is no revision 9). The repository is made of fixed patches, so
// its hashes, and the size at which the first such prefix appears, are the same at every run.
func TestCountRevsIsNotFooledByHashPrefixes(t *testing.T) {
	hg := hg6(t)
	ctx := ctxFor(t, 2*time.Minute)
	src := filepath.Join(t.TempDir(), "src")
	if out, err := hgOut(t, hg, t.TempDir(), "init", src); err != nil {
		t.Fatalf("hg init: %v\n%s", err, out)
	}
	const max = 40
	args := []string{"import", "--quiet"}
	for i := 0; i < max; i++ {
		name := fmt.Sprintf("f%02d.txt", i)
		patch := fmt.Sprintf("# HG changeset patch\n# User detour <detour@localhost>\n# Date %d 0\nadd %s\n\n"+
			"diff --git a/%s b/%s\nnew file mode 100644\n--- /dev/null\n+++ b/%s\n@@ -0,0 +1,1 @@\n+%s\n",
			1700000000+i, name, name, name, name, name)
		path := filepath.Join(t.TempDir(), "p.patch")
		if err := os.WriteFile(path, []byte(patch), 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, path)
	}
	if out, err := hgOut(t, hg, src, args...); err != nil {
		t.Fatalf("hg import: %v\n%s", err, out)
	}
	out, err := hgOut(t, hg, src, "log", "-r", "0:", "-T", "{node}\n")
	if err != nil {
		t.Fatal(err)
	}
	nodes := strings.Fields(out)
	// n: the smallest size at which a changeset's hash starts with the number n.
	n := 0
	for size := 1; size <= len(nodes) && n == 0; size++ {
		for _, node := range nodes[:size] {
			if strings.HasPrefix(node, strconv.Itoa(size)) {
				n = size
				break
			}
		}
	}
	if n == 0 {
		t.Fatalf("no prefix collision among %d fixed changesets; lengthen the history", len(nodes))
	}
	repo := filepath.Join(t.TempDir(), "origin")
	if out, err := hgOut(t, hg, t.TempDir(), "clone", "--quiet", "--noupdate", "-r", strconv.Itoa(n-1), src, repo); err != nil {
		t.Fatalf("hg clone -r: %v\n%s", err, out)
	}
	srv, err := hgserve.Serve(ctx, hg, repo, hgserve.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	o := &hgbundle.Origin{URL: srv.URL, Client: http.DefaultClient}
	caps, err := o.Capabilities(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, known := range []int{0, 1, n - 1, n, n + 1, 2 * n} {
		got, err := hgbundle.CountRevs(ctx, o, caps, known)
		if err != nil {
			t.Fatal(err)
		}
		if got != n {
			t.Fatalf("counted %d changesets (known %d); the repository has %d, and a hash starting with %q", got, known, n, strconv.Itoa(n))
		}
	}
}
