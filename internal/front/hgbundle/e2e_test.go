package hgbundle_test

// End-to-end proof without Detour: a real `hg serve` (Mercurial 6.3.2) as origin, bundles made
// through this package over the wire, served by a Go file server, advertised by a small proxy in
// front of the origin that answers `clonebundles` and adds the capability, and real clients
// (6.3.2, and 5.6.1 with protocol v1) that clone through the proxy.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/front/hgbundle"
	"github.com/detourhq/detour/internal/hgserve"
	"github.com/detourhq/detour/internal/testbed"
)

// hg6 returns Mercurial 6 or 7 ($DETOUR_HG6, else /usr/bin/hg), skipping outside CI when there
// is none.
func hg6(t testing.TB) string {
	t.Helper()
	hg := os.Getenv("DETOUR_HG6")
	if hg == "" {
		hg = "/usr/bin/hg"
	}
	v, err := hgserve.Version(hg)
	if err == nil && (strings.HasPrefix(v, "6.") || strings.HasPrefix(v, "7.")) {
		return hg
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true and no Mercurial 6 at %s: %v %s", hg, err, v)
	}
	t.Skipf("no Mercurial 6 at %s (%v %s)", hg, err, v)
	return ""
}

// hg5 returns Mercurial 5.6.1 (bin/hg, `make hg`), skipping outside CI when there is none.
func hg5(t testing.TB) string {
	t.Helper()
	hg, err := hgserve.Find(".")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true and no Mercurial 5: %v", err)
		}
		t.Skipf("no Mercurial 5 (run `make hg`): %v", err)
	}
	return hg
}

func ctxFor(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// template is a repository built once per test binary: a few hundred files, some history, two
// branches, a tag, bookmarks, public and draft changesets on a non-publishing origin.
var template struct {
	once sync.Once
	dir  string
	err  error
}

func buildTemplate(hg string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "hgbundle-template-")
	if err != nil {
		return "", err
	}
	repo, err := hgserve.Init(ctx, hg, filepath.Join(dir, "origin"))
	if err != nil {
		return "", err
	}
	if err := repo.Populate(1, 300, 2, 64<<10); err != nil {
		return "", err
	}
	if err := repo.Commit(ctx, "initial import"); err != nil {
		return "", err
	}
	for i := 0; i < 4; i++ {
		if err := repo.Populate(uint64(100+i), 20+i, 0, 0); err != nil {
			return "", err
		}
		if err := repo.Commit(ctx, fmt.Sprintf("change %d", i)); err != nil {
			return "", err
		}
	}
	steps := [][]string{
		{"tag", "--quiet", "v1.0"},
		{"phase", "--public", "--rev", "."},
		{"bookmark", "--quiet", "stable"},
		{"branch", "--quiet", "feature"},
	}
	for _, s := range steps {
		if _, err := repo.Hg(ctx, s...); err != nil {
			return "", err
		}
	}
	for i := 0; i < 2; i++ {
		if err := repo.WriteFile(fmt.Sprintf("feature/f%d.txt", i), []byte(fmt.Sprintf("feature %d\n", i))); err != nil {
			return "", err
		}
		if err := repo.Commit(ctx, fmt.Sprintf("feature %d", i)); err != nil {
			return "", err
		}
	}
	if _, err := repo.Hg(ctx, "bookmark", "--quiet", "wip"); err != nil {
		return "", err
	}
	if _, err := repo.Hg(ctx, "update", "--quiet", "default"); err != nil {
		return "", err
	}
	return repo.Dir, nil
}

// origin is a copy of the template served by `hg serve`.
type origin struct {
	hg     string
	repo   *hgserve.Repo
	server *hgserve.Server
}

func newOrigin(t *testing.T, config ...string) *origin {
	t.Helper()
	hg := hg6(t)
	template.once.Do(func() { template.dir, template.err = buildTemplate(hg) })
	if template.err != nil {
		t.Fatalf("build template repository: %v", template.err)
	}
	dir := filepath.Join(t.TempDir(), "origin")
	if err := os.CopyFS(dir, os.DirFS(template.dir)); err != nil {
		t.Fatal(err)
	}
	srv, err := hgserve.Serve(ctxFor(t, 5*time.Minute), hg, dir, hgserve.Options{Dir: t.TempDir(), Config: config})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	return &origin{hg: hg, repo: &hgserve.Repo{HG: hg, Dir: dir}, server: srv}
}

// commit lands n new changesets on the origin's working parent, each adding a file, with one
// `hg import` of n patches (one hg run, however many changesets).
func (o *origin) commit(t *testing.T, n int, tag string) {
	t.Helper()
	dir := t.TempDir()
	args := []string{"import", "--quiet"}
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("new/%s-%d.txt", tag, i)
		patch := fmt.Sprintf("# HG changeset patch\n# User detour <detour@localhost>\n# Date %d 0\nnew %s\n\n"+
			"diff --git a/%s b/%s\nnew file mode 100644\n--- /dev/null\n+++ b/%s\n@@ -0,0 +1,1 @@\n+%s\n",
			1700000000+i, name, name, name, name, name)
		path := filepath.Join(dir, fmt.Sprintf("%04d.patch", i))
		if err := os.WriteFile(path, []byte(patch), 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, path)
	}
	if _, err := o.repo.Hg(ctxFor(t, 5*time.Minute), args...); err != nil {
		t.Fatal(err)
	}
}

// proxy stands in front of the origin: it answers `clonebundles` with its manifest (when one is
// set: the entries ForClient keeps for the requesting client, or all of them when raw), adds the
// capability, passes everything else through, logs the commands and counts the bytes the origin
// sends.
type proxy struct {
	*httptest.Server
	manifest    atomic.Pointer[[]hgbundle.Entry]
	raw         atomic.Bool
	originBytes atomic.Int64
	// fillBytes are the bytes of the bundles Detour's agent fetched (its getbundle), apart from
	// originBytes.
	fillBytes   atomic.Int64
	mu          sync.Mutex
	commands    []string
	protoHeader string // X-HgProto-1 of the last clonebundles request
}

func newProxy(t *testing.T, originURL string) *proxy {
	t.Helper()
	target, err := url.Parse(originURL)
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.Transport = countingTransport{http.DefaultTransport, &p.originBytes, &p.fillBytes}
	rp.ModifyResponse = func(resp *http.Response) error {
		if resp.Request.URL.Query().Get("cmd") != "capabilities" || p.manifest.Load() == nil {
			return nil
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		if body, err = hgbundle.AddCloneBundles(body); err != nil {
			return err
		}
		resp.Body = io.NopCloser(bytes.NewReader(body))
		resp.ContentLength = int64(len(body))
		resp.Header.Set("Content-Length", fmt.Sprint(len(body)))
		return nil
	}
	p.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cmd := r.URL.Query().Get("cmd")
		p.mu.Lock()
		p.commands = append(p.commands, cmd)
		if cmd == "clonebundles" {
			p.protoHeader = r.Header.Get("X-HgProto-1")
		}
		if testing.Verbose() && cmd != "capabilities" {
			var args strings.Builder
			for i := 1; r.Header.Get(fmt.Sprintf("X-HgArg-%d", i)) != ""; i++ {
				args.WriteString(r.Header.Get(fmt.Sprintf("X-HgArg-%d", i)))
			}
			q, _ := url.ParseQuery(args.String())
			fmt.Fprintf(os.Stderr, "proxy: %s %v X-HgProto-1=%q\n", cmd, q, r.Header.Get("X-HgProto-1"))
		}
		p.mu.Unlock()
		if es := p.manifest.Load(); cmd == "clonebundles" && es != nil {
			entries := *es
			if !p.raw.Load() {
				entries = hgbundle.ForClient(entries, r.Header)
			}
			m, err := hgbundle.EncodeManifest(entries)
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			w.Header().Set("Content-Type", "application/mercurial-0.1")
			w.Write(m)
			return
		}
		testbed.ServeProxy(w, r, rp)
	}))
	t.Cleanup(p.Close)
	return p
}

func (p *proxy) setManifest(t *testing.T, entries []hgbundle.Entry) {
	t.Helper()
	if _, err := hgbundle.EncodeManifest(entries); err != nil {
		t.Fatal(err)
	}
	if entries == nil {
		entries = []hgbundle.Entry{}
	}
	p.manifest.Store(&entries)
}

func (p *proxy) takeCommands() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.commands
	p.commands = nil
	return out
}

type countingTransport struct {
	http.RoundTripper
	n, fills *atomic.Int64
}

func (c countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := c.RoundTripper.RoundTrip(r)
	if err == nil {
		n := c.n
		if c.fills != nil && r.URL.Query().Get("cmd") == "getbundle" && strings.Contains(r.Header.Get("User-Agent"), "Detour") {
			n = c.fills
		}
		resp.Body = &countingBody{resp.Body, n}
	}
	return resp, err
}

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}

// files serves bundle files from a directory and records the paths fetched.
type files struct {
	*httptest.Server
	dir     string
	mu      sync.Mutex
	fetched []string
}

func newFiles(t *testing.T) *files {
	t.Helper()
	f := &files{dir: t.TempDir()}
	fs := http.FileServer(http.Dir(f.dir))
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.fetched = append(f.fetched, r.URL.Path)
		f.mu.Unlock()
		fs.ServeHTTP(w, r)
	}))
	t.Cleanup(f.Close)
	return f
}

func (f *files) takeFetched() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := f.fetched
	f.fetched = nil
	return out
}

// bundleFile is one bundle written by makeBundles.
type bundleFile struct {
	name, spec string
	heads      []hgbundle.Node
}

// makeBundles fetches a full bundle over the wire and writes it as none-v2, gzip-v2 and
// zstd-v2, and a stream bundle when the origin allows it, into dir.
func makeBundles(t *testing.T, originURL, dir string) map[string]bundleFile {
	t.Helper()
	ctx := ctxFor(t, 2*time.Minute)
	o := &hgbundle.Origin{URL: originURL}
	caps, err := o.Capabilities(ctx)
	if err != nil {
		t.Fatal(err)
	}
	heads, err := o.Heads(ctx, caps)
	if err != nil {
		t.Fatal(err)
	}
	full, err := o.FullBundle(ctx, caps, heads)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bundleFile{}
	none := filepath.Join(dir, "full.none.hg")
	writeFile(t, none, full.Body)
	out["none"] = bundleFile{"full.none.hg", full.Spec, full.Heads}
	for _, c := range []hgbundle.Compression{hgbundle.Gzip, hgbundle.Zstd} {
		src, err := os.Open(none)
		if err != nil {
			t.Fatal(err)
		}
		name := "full." + string(c) + ".hg"
		writeFile(t, filepath.Join(dir, name), hgbundle.CompressReader(src, c))
		src.Close()
		out[string(c)] = bundleFile{name, c.BundleSpec(), full.Heads}
	}
	stream, err := o.StreamBundle(ctx, caps, heads)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "full.stream.hg"), stream.Body)
	out["stream"] = bundleFile{"full.stream.hg", stream.Spec, stream.Heads}
	return out
}

func writeFile(t *testing.T, path string, r io.ReadCloser) {
	t.Helper()
	defer r.Close()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		t.Fatalf("write %s: %v", path, err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// hgOut runs hg and returns its standard output and error together.
func hgOut(t *testing.T, hg, dir string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.CommandContext(ctxFor(t, 2*time.Minute), hg, args...)
	cmd.Dir = dir
	cmd.Env = hgserve.Env()
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// state describes a clone for comparison: every changeset (its node names its content and
// ancestry) with its phase, branch, tags and bookmarks; and `hg verify` must pass.
func state(t *testing.T, hg, repo string) string {
	t.Helper()
	ctx := ctxFor(t, time.Minute)
	out, err := hgserve.Run(ctx, hg, repo, "log", "-r", "all()", "-T", "{node} {phase} {branch} tags:{tags} bookmarks:{bookmarks}\n")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hgserve.Run(ctx, hg, repo, "verify", "--quiet"); err != nil {
		t.Fatalf("hg verify %s: %v", repo, err)
	}
	return string(out)
}

// directClone clones from the origin itself and returns its state.
func directClone(t *testing.T, hg, originURL string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "direct")
	if out, err := hgOut(t, hg, t.TempDir(), "clone", "--noupdate", originURL, dir); err != nil {
		t.Fatalf("direct clone: %v\n%s", err, out)
	}
	return state(t, hg, dir)
}

func TestFullBundleIsWhatHgBundleWrites(t *testing.T) {
	o := newOrigin(t)
	dir := t.TempDir()
	bundles := makeBundles(t, o.server.URL, dir)
	ctx := ctxFor(t, time.Minute)

	// Mercurial's own full bundle of the same repository, uncompressed.
	own := filepath.Join(dir, "own.none.hg")
	if _, err := o.repo.Hg(ctx, "bundle", "--quiet", "--all", "--type", "none-v2", own); err != nil {
		t.Fatal(err)
	}
	ours, err := os.ReadFile(filepath.Join(dir, bundles["none"].name))
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := os.ReadFile(own)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ours, theirs) {
		t.Errorf("the bundle fetched over the wire (%d bytes) differs from `hg bundle --all -t none-v2` (%d bytes)\nours:\n%s\ntheirs:\n%s",
			len(ours), len(theirs), debugBundle(t, o.hg, filepath.Join(dir, bundles["none"].name)), debugBundle(t, o.hg, own))
	}

	// Every file says the spec we advertise for it, and holds the origin's heads.
	heads, err := o.repo.Hg(ctx, "log", "-r", "heads(all())", "-T", "{node}\n")
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range bundles {
		path := filepath.Join(dir, b.name)
		spec, err := o.repo.Hg(ctx, "debugbundle", "--spec", path)
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.TrimSpace(string(spec)); got != b.spec {
			t.Errorf("%s: hg debugbundle --spec says %q, we say %q", name, got, b.spec)
		}
		wantHeads := strings.Fields(string(heads))
		sort.Strings(wantHeads)
		if fmt.Sprint(b.heads) != fmt.Sprint(wantHeads) {
			t.Errorf("%s: covers %d heads, origin has %s", name, len(b.heads), heads)
		}
	}
	if parts := debugBundle(t, o.hg, filepath.Join(dir, bundles["zstd"].name)); !strings.Contains(parts, "changegroup -- {nbchanges: 8, version: 02}") ||
		!strings.Contains(parts, "hgtagsfnodes") || !strings.Contains(parts, "cache:rev-branch-cache") ||
		strings.Contains(parts, "phase-heads") || strings.Contains(parts, "bookmarks") {
		t.Errorf("zstd bundle parts:\n%s", parts)
	}
}

func debugBundle(t *testing.T, hg, path string) string {
	out, err := hgOut(t, hg, filepath.Dir(path), "debugbundle", path)
	if err != nil {
		t.Fatalf("debugbundle: %v\n%s", err, out)
	}
	var keep []string
	for _, l := range strings.Split(out, "\n") {
		if !strings.HasPrefix(l, "    ") { // drop the changeset list
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// TestCloneAppliesBundleAndPullsTheRest is the whole exchange with the 6.3.2 client: bundles
// made over the wire, a changeset landing on the origin afterwards, and a clone per format that
// applies the bundle from the file server and pulls the rest; each clone equals a direct clone.
func TestCloneAppliesBundleAndPullsTheRest(t *testing.T) {
	o := newOrigin(t)
	fs := newFiles(t)
	bundles := makeBundles(t, o.server.URL, fs.dir)
	p := newProxy(t, o.server.URL)

	// After the bundles were made: a new changeset, a bookmark moved, a changeset published.
	o.commit(t, 1, "late")
	ctx := ctxFor(t, time.Minute)
	if _, err := o.repo.Hg(ctx, "bookmark", "--force", "--rev", "tip", "stable"); err != nil {
		t.Fatal(err)
	}
	if _, err := o.repo.Hg(ctx, "phase", "--public", "--rev", "wip"); err != nil {
		t.Fatal(err)
	}
	want := directClone(t, o.hg, o.server.URL)

	for _, format := range []string{"gzip", "zstd", "stream"} {
		t.Run(format, func(t *testing.T) {
			b := bundles[format]
			p.setManifest(t, []hgbundle.Entry{{URL: fs.URL + "/" + b.name, BundleSpec: b.spec}})
			p.takeCommands()
			fs.takeFetched()
			dir := filepath.Join(t.TempDir(), "clone")
			out, err := hgOut(t, o.hg, t.TempDir(), "clone", "--noupdate", p.URL, dir)
			if err != nil {
				t.Fatalf("clone: %v\n%s", err, out)
			}
			if !strings.Contains(out, "applying clone bundle from "+fs.URL+"/"+b.name) ||
				!strings.Contains(out, "finished applying clone bundle") {
				t.Fatalf("the clone did not apply the bundle:\n%s", out)
			}
			if !strings.Contains(out, "added 1 changesets") {
				t.Errorf("the pull after the bundle did not bring the one new changeset:\n%s", out)
			}
			if got := fs.takeFetched(); len(got) != 1 || got[0] != "/"+b.name {
				t.Errorf("bundle fetches %v", got)
			}
			cmds := p.takeCommands()
			t.Logf("commands through the proxy: %v", cmds)
			if len(cmds) < 3 || cmds[0] != "capabilities" || cmds[1] != "clonebundles" {
				t.Errorf("commands %v: want capabilities, clonebundles first", cmds)
			}
			if got := state(t, o.hg, dir); got != want {
				t.Errorf("clone through the bundle differs from a direct clone\n got:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

// TestOldClientAppliesBundles is the same with the 5.6.1 client over protocol v1. It has no
// zstd module, and a manifest with a zstd entry, or a stream bundle whose store is zstd, fails
// its clone (see ForClient); filtered for it, the manifest leaves the gzip bundle, which it
// applies.
func TestOldClientAppliesBundles(t *testing.T) {
	old := hg5(t)
	o := newOrigin(t)
	fs := newFiles(t)
	bundles := makeBundles(t, o.server.URL, fs.dir)
	p := newProxy(t, o.server.URL)
	o.commit(t, 2, "late")
	want := directClone(t, old, o.server.URL)
	s, z, g := bundles["stream"], bundles["zstd"], bundles["gzip"]
	entry := func(b bundleFile) hgbundle.Entry {
		return hgbundle.Entry{URL: fs.URL + "/" + b.name, BundleSpec: b.spec}
	}
	if reqs, _ := hgbundle.StreamSpecRequirements(s.spec); !slices.Contains(reqs, "revlog-compression-zstd") {
		t.Fatalf("the origin's store is not zstd (%s): this test needs one", s.spec)
	}
	tests := []struct {
		name    string
		entries []hgbundle.Entry
		raw     bool
		fails   string // what the clone's output says when it fails
	}{
		{name: "filtered for the client", entries: []hgbundle.Entry{entry(s), entry(z), entry(g)}},
		{name: "zstd entry unfiltered", entries: []hgbundle.Entry{entry(g), entry(z)}, raw: true,
			fails: "abort: compression engine zstd could not be loaded"},
		{name: "zstd stream unfiltered", entries: []hgbundle.Entry{entry(s), entry(g)}, raw: true,
			fails: "unsupported format: revlog-compression-zstd"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p.setManifest(t, tt.entries)
			p.raw.Store(tt.raw)
			dir := filepath.Join(t.TempDir(), "clone")
			out, err := hgOut(t, old, t.TempDir(), "clone", "--noupdate", p.URL, dir)
			p.mu.Lock()
			t.Logf("5.6.1 sent X-HgProto-1: %s", p.protoHeader)
			p.mu.Unlock()
			if tt.fails != "" {
				if err == nil || !strings.Contains(out, tt.fails) {
					t.Fatalf("clone: %v, want a failure saying %q:\n%s", err, tt.fails, out)
				}
				return
			}
			if err != nil {
				t.Fatalf("clone: %v\n%s", err, out)
			}
			if !strings.Contains(out, "applying clone bundle from "+fs.URL+"/"+g.name) || !strings.Contains(out, "added 2 changesets") {
				t.Fatalf("5.6.1 did not apply the gzip bundle and pull the rest:\n%s", out)
			}
			if got := state(t, old, dir); got != want {
				t.Errorf("clone through the bundle differs from a direct clone\n got:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

// TestClientWithoutUsableBundle pins what the 6.3.2 client does when the manifest gives it
// nothing to apply, or a bundle that is not there.
func TestClientWithoutUsableBundle(t *testing.T) {
	o := newOrigin(t)
	fs := newFiles(t)
	p := newProxy(t, o.server.URL)
	want := directClone(t, o.hg, o.server.URL)
	tests := []struct {
		name    string
		entries []hgbundle.Entry
		config  []string
		fails   bool
		output  []string
	}{
		{name: "empty manifest", output: []string{"requesting all changes"}},
		{name: "no compatible entry", entries: []hgbundle.Entry{{URL: fs.URL + "/x.hg", BundleSpec: "lz4-v2"}},
			output: []string{"no compatible clone bundles available on server; falling back to regular clone", "requesting all changes"}},
		{name: "bundle missing", entries: []hgbundle.Entry{{URL: fs.URL + "/missing.hg", BundleSpec: "gzip-v2"}},
			fails: true, output: []string{"HTTP error fetching bundle: HTTP Error 404", "abort: error applying bundle"}},
		{name: "bundle missing with fallback", entries: []hgbundle.Entry{{URL: fs.URL + "/missing.hg", BundleSpec: "gzip-v2"}},
			config: []string{"ui.clonebundlefallback=true"},
			output: []string{"HTTP error fetching bundle: HTTP Error 404", "falling back to normal clone", "requesting all changes"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p.setManifest(t, tt.entries)
			p.takeCommands()
			dir := filepath.Join(t.TempDir(), "clone")
			args := hgserve.WithConfig(tt.config, "clone", "--verbose", "--noupdate", p.URL, dir)
			out, err := hgOut(t, o.hg, t.TempDir(), args...)
			if (err != nil) != tt.fails {
				t.Fatalf("clone error %v, want failure %v\n%s", err, tt.fails, out)
			}
			for _, s := range tt.output {
				if !strings.Contains(out, s) {
					t.Errorf("output lacks %q:\n%s", s, out)
				}
			}
			cmds := p.takeCommands()
			t.Logf("commands through the proxy: %v", cmds)
			if tt.fails {
				if _, err := os.Stat(dir); err == nil {
					t.Errorf("a failed clone left %s behind", dir)
				}
				if len(cmds) != 2 {
					t.Errorf("a failed clone sent %v; want only capabilities and clonebundles", cmds)
				}
				return
			}
			if got := state(t, o.hg, dir); got != want {
				t.Errorf("clone differs from a direct clone\n got:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

// TestOriginRefusals: what the real origin refuses or changes under a bundle surfaces as an
// error of the bundle's reader, never as a short bundle.
func TestOriginRefusals(t *testing.T) {
	o := newOrigin(t)
	ctx := ctxFor(t, 2*time.Minute)
	origin := &hgbundle.Origin{URL: o.server.URL}
	caps, err := origin.Capabilities(ctx)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("unknown head", func(t *testing.T) {
		unknown, _ := hgbundle.ParseNode(strings.Repeat("12", 20))
		b, err := origin.FullBundle(ctx, caps, []hgbundle.Node{unknown})
		if err == nil {
			_, err = io.ReadAll(b.Body)
			b.Body.Close()
		}
		if err == nil {
			t.Fatal("a bundle of an unknown head")
		}
		t.Logf("origin's refusal: %v", err) // hg serve answers 500: the lookup error is no Abort
	})

	t.Run("full bundles disabled", func(t *testing.T) {
		closed := newOrigin(t, "server.disablefullbundle=true")
		origin := &hgbundle.Origin{URL: closed.server.URL}
		b, err := origin.FullBundle(ctx, caps, nil)
		if err == nil {
			_, err = io.ReadAll(b.Body)
			b.Body.Close()
		}
		if !errors.Is(err, hgbundle.ErrOriginAbort) || !strings.Contains(err.Error(), "pull-based clones disabled") {
			t.Fatalf("err %v, want ErrOriginAbort for pull-based clones disabled", err)
		}
	})

	t.Run("heads move under a stream", func(t *testing.T) {
		b, err := origin.StreamBundle(ctx, caps, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Body.Close()
		o.commit(t, 1, "moved")
		if _, err := io.ReadAll(b.Body); !errors.Is(err, hgbundle.ErrHeadsMoved) {
			t.Fatalf("err %v, want ErrHeadsMoved", err)
		}
	})

	t.Run("streaming not allowed", func(t *testing.T) {
		closed := newOrigin(t, "server.uncompressed=false")
		origin := &hgbundle.Origin{URL: closed.server.URL}
		caps, err := origin.Capabilities(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := caps.StreamRequirements(); ok {
			t.Fatalf("capabilities offer streaming: %s", caps)
		}
		if _, err := origin.StreamBundle(ctx, caps, nil); err == nil {
			t.Fatal("asked for a stream the origin does not allow")
		}
	})
}
