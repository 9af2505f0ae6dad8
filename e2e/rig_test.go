// Package e2e tests Detour end to end with real parts in real processes: a real Mercurial (client
// and `hg serve`), the control plane and agent binaries, an embedded etcd, and a GCS-API server
// reached through the real storage client.
package e2e

import (
	"bytes"
	"context"
	"io"
	"io/fs"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/gcsemu"
	"github.com/detourhq/detour/internal/hgclient"
	"github.com/detourhq/detour/internal/hgserve"
	"github.com/detourhq/detour/internal/testbed"
)

const (
	bucket = "detour-e2e"
	target = "e2e-gcs"
	repoID = "e2e-repo"
)

// findHG returns the real Mercurial, skipping the test when it is absent outside CI and failing it
// in CI, where `make hg` must have installed it.
func findHG(t testing.TB) string {
	t.Helper()
	hg, err := hgserve.Find(".")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true and no real Mercurial: %v", err)
		}
		t.Skipf("no real Mercurial (run `make hg`): %v", err)
	}
	return hg
}

// rig is a whole deployment: origin `hg serve` behind a byte-counting tap, GCS emulator, control
// plane and agent processes, and a recording tap in front of the agent.
type rig struct {
	t         testing.TB
	hg        string
	repo      *hgserve.Repo
	origin    *hgserve.Server
	originTap *tap // between the agent (and direct clients) and hg serve
	gcs       *gcsemu.Server
	front     *gcsemu.Front // the target's client-facing URL, where faults are injected
	cp        *testbed.ControlPlane
	agent     *testbed.Agent
	agentTap  *tap // between clients and the agent
	admin     pb.AdminServiceClient
	work      string
	clones    atomic.Int32
	// agentFlags are added to every agent startAgent starts.
	agentFlags []string
	// agentOrigin is what agents use as their origin (default: the origin's tap).
	agentOrigin string
	// locations, if set, is the base of the targets' client-facing URLs (default: the front).
	locations string

	// With rigOptions.users: the authenticating proxy the agent uses as its origin, and the
	// number of location fetches that carried an Authorization header.
	authProxy    *authProxy
	locationAuth atomic.Int64
	credentials  http.Header // what the rig's own client checks send (one of the users)
}

// rigOptions vary the deployment.
type rigOptions struct {
	// users (name → password), if set, put HTTP basic authentication in front of the origin, as
	// a web server in front of hgweb does (hg serve has none): the agent's origin is then the
	// proxy, and the target's client-facing URL records whether fetches carry credentials.
	users map[string]string
}

// repoShape sizes the test repository: several changesets, a few hundred files, and files over
// 1 MiB so that one filesdata response is over 10 MB.
type repoShape struct {
	files, bigFiles, bigSize int
}

var fullRepo = repoShape{files: 300, bigFiles: 6, bigSize: 2 << 20}

func newRig(t testing.TB, shape repoShape) *rig {
	t.Helper()
	return newRigWith(t, shape, rigOptions{})
}

// newRigWith is newRig with opts.
func newRigWith(t testing.TB, shape repoShape, opts rigOptions) *rig {
	t.Helper()
	r := newBareRig(t, shape, "--region", "test")
	if opts.users != nil {
		r.authProxy = newAuthProxy(t, r.originTap.URL, opts.users)
		for user, pass := range opts.users {
			req := httptest.NewRequest(http.MethodGet, "/", nil)
			req.SetBasicAuth(user, pass)
			r.credentials = http.Header{"Authorization": req.Header["Authorization"]}
			break
		}
		r.agentOrigin = r.authProxy.URL
		front, err := url.Parse(r.front.URL)
		r.must(err)
		proxy := httputil.NewSingleHostReverseProxy(front)
		locations := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			if req.Header.Get("Authorization") != "" {
				r.locationAuth.Add(1)
			}
			testbed.ServeProxy(w, req, proxy)
		}))
		t.Cleanup(locations.Close)
		r.locations = locations.URL + "/"
	}
	r.addTarget(target, bucket, "test")
	r.agent, r.agentTap = r.startAgent("test", target)
	return r
}

// newBareRig starts the origin (a repository of shape, with history) behind its tap, the GCS
// emulator and a control plane started with cpFlags; no targets and no agent yet.
func newBareRig(t testing.TB, shape repoShape, cpFlags ...string) *rig {
	t.Helper()
	return newBareRigOf(t, func(r *rig) {
		// History: two public changesets, two drafts, a bookmark on a draft.
		if err := r.repo.Populate(1, shape.files, shape.bigFiles, shape.bigSize); err != nil {
			t.Fatal(err)
		}
		r.commit("initial import")
		for i := 1; i <= 3; i++ {
			r.must(r.repo.WriteFile("src/dir01/file001.txt", []byte(strings.Repeat("change ", i*10))))
			r.must(r.repo.Populate(uint64(100+i), 20, 1, 1536<<10))
			r.commit("change " + string(rune('0'+i)))
		}
		r.hgOrigin("bookmark", "--rev", "2", "feature")
		r.hgOrigin("phase", "--public", "--rev", "1")
	}, cpFlags...)
}

// newBareRigOf is newBareRig with a repository that build makes in r.repo.
func newBareRigOf(t testing.TB, build func(r *rig), cpFlags ...string) *rig {
	t.Helper()
	ctx := context.Background()
	r := &rig{t: t, hg: findHG(t), work: t.TempDir()}
	var err error
	if r.repo, err = hgserve.Init(ctx, r.hg, filepath.Join(r.work, "origin")); err != nil {
		t.Fatal(err)
	}
	build(r)

	if r.origin, err = hgserve.Serve(ctx, r.hg, r.repo.Dir, hgserve.Options{V2: true, Dir: r.work}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.origin.Close)
	r.originTap = newTap(t, r.origin.URL)

	if r.gcs, err = gcsemu.Start(0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.gcs.Stop)

	if r.front, err = r.gcs.StartFront(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.front.Close)
	r.cp = testbed.StartControlPlane(t, append([]string{"--gcs-endpoint", r.gcs.Endpoint()}, cpFlags...)...)
	r.admin = pb.NewAdminServiceClient(testbed.Dial(t, r.cp.Addr, testbed.PKI(t).Operator))
	// A cold clone fills what it misses, so that the next one is warm: fill on the first miss.
	_, err = r.admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: &pb.Policy{MinOccurrences: 1}})
	r.must(err)
	_, err = r.admin.GetPolicy(ctx, &pb.GetPolicyRequest{}) // returns once the snapshot has it
	r.must(err)
	return r
}

// addTarget makes bucket in the emulator and registers target name on it, in region, with the
// emulator's public URLs (through the fault-injecting front) as its client-facing form.
func (r *rig) addTarget(name, bucket, region string) {
	r.t.Helper()
	r.gcs.CreateBucket(bucket)
	public := r.front.PublicURL(bucket)
	if r.locations != "" {
		public = r.locations + bucket + "/"
	}
	if _, err := r.admin.CreateTarget(context.Background(), &pb.CreateTargetRequest{Target: &pb.Target{Name: name, Protocol: "http",
		Uris: []string{public}, Region: region, Weight: 1, Store: &pb.GcsStore{Bucket: bucket, Prefix: "objects/"},
		UrlForm: &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: public}}}}); err != nil {
		r.t.Fatal(err)
	}
}

// startAgent starts an agent process in region in front of the origin's tap, with a recording tap
// in front of it, and waits until it advertises every one of want.
func (r *rig) startAgent(region string, want ...string) (*testbed.Agent, *tap) {
	r.t.Helper()
	// A generous place timeout: these tests are about what a real client gets, and on a loaded
	// machine 50ms can pass before a claim is written, which leaves a key unfilled (inline, still
	// correct) and a later "warm" request cold. Latency under load is the chaos tests' subject.
	origin := r.originTap.URL
	if r.agentOrigin != "" {
		origin = r.agentOrigin
	}
	a := testbed.StartAgent(r.t, origin, append([]string{"--controlplane", r.cp.Addr, "--region", region,
		"--agent-id", "agent-" + region, "--gcs-endpoint", r.gcs.Endpoint(), "--repo-id", repoID, "--place-timeout", "2s"},
		r.agentFlags...)...)
	r.waitAdvertised(a, func(names []string) bool {
		for _, w := range want {
			if !slices.Contains(names, w) {
				return false
			}
		}
		return true
	})
	return a, newTap(r.t, a.URL)
}

// waitAdvertised waits until the targets agent a advertises (in its order) satisfy ok.
func (r *rig) waitAdvertised(a *testbed.Agent, ok func(names []string) bool) {
	r.t.Helper()
	testbed.Eventually(r.t, 20*time.Second, "the agent's advertisement", func() bool {
		hs, err := (&hgclient.Client{Base: a.URL, Header: r.credentials}).Capabilities(context.Background())
		var names []string
		if err == nil && hs.Redirect != nil {
			names = hgclient.Accepted(hs.Redirect, "http")
		}
		return err == nil && ok(names)
	})
}

// advertises reports whether the rig's agent's capabilities offer name to an http client.
func (r *rig) advertises(name string) bool {
	hs, err := (&hgclient.Client{Base: r.agent.URL, Header: r.credentials}).Capabilities(context.Background())
	return err == nil && hs.Redirect != nil && slices.Contains(hgclient.Accepted(hs.Redirect, "http"), name)
}

func (r *rig) must(err error) {
	r.t.Helper()
	if err != nil {
		r.t.Fatal(err)
	}
}

func (r *rig) commit(msg string) {
	r.t.Helper()
	r.must(r.repo.Commit(context.Background(), msg))
}

func (r *rig) hgOrigin(args ...string) string {
	r.t.Helper()
	out, err := r.repo.Hg(context.Background(), args...)
	r.must(err)
	return string(out)
}

// hgIn runs hg in dir with the v2 client configuration.
func (r *rig) hgIn(dir string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), hgTimeout(r.t))
	defer cancel()
	out, err := hgserve.Run(ctx, r.hg, dir, hgserve.WithConfig(hgserve.ClientConfig, args...)...)
	return string(out), err
}

// hgTimeout bounds one hg run: 5 minutes, and never closer than 30s to the test binary's
// deadline. Mercurial 5.6's v2 client waits forever for the rest of a command answer that was cut
// (wireprotov2peer's commandresponse.objects): killed in time, the run fails the test with hg's
// output and the processes' logs, instead of the binary's timeout panic, which prints neither.
func hgTimeout(t testing.TB) time.Duration {
	d := 5 * time.Minute
	if dt, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if deadline, ok := dt.Deadline(); ok {
			d = min(d, max(time.Until(deadline)-30*time.Second, 5*time.Second))
		}
	}
	return d
}

// clone clones url into a new directory with the v2 client and --debug, returning the directory
// and hg's output. extra are further hg arguments (e.g. --config for an extension).
func (r *rig) clone(url string, extra ...string) (string, string) {
	r.t.Helper()
	dir := filepath.Join(r.work, "clone-"+string(rune('a'+r.clones.Add(1)-1)))
	out, err := r.hgIn(r.work, append(append([]string{"clone", "--debug"}, extra...), url, dir)...)
	if err != nil {
		r.t.Fatalf("clone %s: %v\n%s", url, err, tailLines(out, 40))
	}
	return dir, out
}

// redirectsFollowed counts the content redirects hg --debug says it followed.
func redirectsFollowed(out string) int { return strings.Count(out, "(following redirect to ") }

var commandSent = regexp.MustCompile(`sending command (\w+):`)

// commandsSent lists the v2 commands hg --debug says it sent.
func commandsSent(out string) []string {
	var cmds []string
	for _, m := range commandSent.FindAllStringSubmatch(out, -1) {
		cmds = append(cmds, m[1])
	}
	return cmds
}

// state describes a clone as a user sees it: every changeset with its phase, parents, bookmarks and
// files; the working directory's parent; and the working tree's bytes.
func (r *rig) state(dir string) string {
	r.t.Helper()
	// One hg run (each costs the pure-Python client most of a second): the working directory's
	// parent is the changeset marked "@".
	log, err := r.hgIn(dir, "log", "--rev", "all()", "--template",
		"{node} {phase} p1={p1.node} p2={p2.node} [{join(bookmarks, ',')}] {ifcontains(rev, revset('.'), '@')} {files}\n")
	r.must(err)
	var tree strings.Builder
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == ".hg" {
			return filepath.SkipDir
		}
		if d.Type().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(dir, p)
			tree.WriteString(rel + " " + hashHex(b) + "\n")
		}
		return nil
	})
	r.must(err)
	return "log:\n" + log + "tree:\n" + tree.String()
}

// verify runs hg verify in a clone.
func (r *rig) verify(dir string) {
	r.t.Helper()
	if out, err := r.hgIn(dir, "verify"); err != nil {
		r.t.Fatalf("hg verify in %s: %v\n%s", dir, err, out)
	}
}

// assertSame fails with a diff-like message when two clones differ.
func assertSame(t testing.TB, what, want, got string) {
	t.Helper()
	if want == got {
		return
	}
	wl, gl := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < len(wl) || i < len(gl); i++ {
		var w, g string
		if i < len(wl) {
			w = wl[i]
		}
		if i < len(gl) {
			g = gl[i]
		}
		if w != g {
			t.Fatalf("%s differs from the origin's clone at line %d:\n origin: %.300s\n  agent: %.300s", what, i+1, w, g)
		}
	}
}

func tailLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// tap is a reverse proxy that counts response bytes and keeps the bodies of v2 command requests.
type tap struct {
	URL           string
	responseBytes atomic.Int64
	mu            sync.Mutex
	requests      map[string][][]byte // command → request bodies
	bytesBy       map[string]int64    // command → response bytes
	keys          map[string]bool     // content keys the answers named (agent.HeaderContentKey)
}

func newTap(t testing.TB, upstream string) *tap {
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	tp := &tap{requests: map[string][][]byte{}, bytesBy: map[string]int64{}, keys: map[string]bool{}}
	proxy := httputil.NewSingleHostReverseProxy(u)
	proxy.FlushInterval = -1
	proxy.ModifyResponse = func(resp *http.Response) error {
		resp.Body = &countingBody{ReadCloser: resp.Body, n: &tp.responseBytes, tap: tp, command: commandOf(resp.Request)}
		if k := resp.Header.Get(agent.HeaderContentKey); k != "" {
			tp.mu.Lock()
			tp.keys[k] = true
			tp.mu.Unlock()
		}
		return nil
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if i := strings.Index(req.URL.Path, "/ro/"); i >= 0 && req.Method == http.MethodPost {
			body, err := io.ReadAll(req.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			tp.mu.Lock()
			cmd := req.URL.Path[i+len("/ro/"):]
			tp.requests[cmd] = append(tp.requests[cmd], body)
			tp.mu.Unlock()
			req.Body = io.NopCloser(bytes.NewReader(body))
		}
		testbed.ServeProxy(w, req, proxy)
	}))
	t.Cleanup(srv.Close)
	tp.URL = srv.URL + "/"
	return tp
}

// Requests returns the bodies of the command requests seen for cmd.
func (tp *tap) Requests(cmd string) [][]byte {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return slices.Clone(tp.requests[cmd])
}

// TakeKeys returns the content keys the answers named since the last call.
func (tp *tap) TakeKeys() map[string]bool {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	k := tp.keys
	tp.keys = map[string]bool{}
	return k
}

// BytesBy returns the response bytes counted so far by command.
func (tp *tap) BytesBy() map[string]int64 {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return maps.Clone(tp.bytesBy)
}

// commandOf names a request to a Mercurial server: its v2 command, its v1 `cmd`, or its method.
func commandOf(req *http.Request) string {
	if i := strings.Index(req.URL.Path, "/ro/"); i >= 0 {
		return req.URL.Path[i+len("/ro/"):]
	}
	if c := req.URL.Query().Get("cmd"); c != "" {
		return c
	}
	return req.Method
}

type countingBody struct {
	io.ReadCloser
	n       *atomic.Int64
	tap     *tap
	command string
}

func (c *countingBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n.Add(int64(n))
	if c.tap != nil && n > 0 {
		c.tap.mu.Lock()
		c.tap.bytesBy[c.command] += int64(n)
		c.tap.mu.Unlock()
	}
	return n, err
}

// bytesSince is the response bytes by command counted since before.
func bytesSince(before, after map[string]int64) map[string]int64 {
	out := map[string]int64{}
	for k, v := range after {
		if d := v - before[k]; d != 0 {
			out[k] = d
		}
	}
	return out
}

func writeFile(name, content string) error { return os.WriteFile(name, []byte(content), 0o644) }

// runHG runs hg without the v2 client configuration (a protocol v1 client).
func runHG(ctx context.Context, hg, dir string, args ...string) (string, error) {
	out, err := hgserve.Run(ctx, hg, dir, args...)
	return string(out), err
}

// authProxy is HTTP basic authentication in front of an upstream, as a web server puts in front
// of hgweb. It counts the requests it refused.
type authProxy struct {
	URL     string
	refused atomic.Int64
	proxy   *httputil.ReverseProxy
}

func newAuthProxy(t testing.TB, upstream string, users map[string]string) *authProxy {
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	p := &authProxy{proxy: httputil.NewSingleHostReverseProxy(u)}
	p.proxy.FlushInterval = -1
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		user, pass, ok := req.BasicAuth()
		if want, known := users[user]; !ok || !known || pass != want {
			p.refused.Add(1)
			w.Header().Set("WWW-Authenticate", `Basic realm="private repository"`)
			http.Error(w, "authorization required", http.StatusUnauthorized)
			return
		}
		// Full duplex: a cut command answer leaves Mercurial 5.6's client waiting forever.
		testbed.ServeProxy(w, req, p.proxy)
	}))
	t.Cleanup(srv.Close)
	p.URL = srv.URL + "/"
	return p
}
