package hgv2_test

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/demoorigin"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/hgclient"
	"github.com/detourhq/detour/internal/wire"
)

// privateOrigin is the demo origin behind HTTP basic authentication, as a web server in front of
// hgweb protects a repository. Repositories live under paths ("" is the root); each has the users
// it admits (nil: anyone, anonymous included). It counts the access checks it answers (GET
// ?cmd=capabilities without the v2 upgrade headers, which clients always send) per Authorization
// value, and the command requests that reach it, answered or refused.
type privateOrigin struct {
	demo  *demoorigin.Origin
	repos map[string]map[string]string // path → user → password
	delay time.Duration                // added to every access check
	URL   string

	mu       sync.Mutex
	checks   map[string]int // "path Authorization" → checks answered
	commands map[string]int // path → command requests received
}

func newPrivateOrigin(t *testing.T, repos map[string]map[string]string) *privateOrigin {
	p := &privateOrigin{demo: demoorigin.New(200 << 10), repos: repos, checks: map[string]int{}, commands: map[string]int{}}
	srv := httptest.NewServer(p)
	t.Cleanup(srv.Close)
	p.URL = srv.URL + "/"
	return p
}

func (p *privateOrigin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	repo, users := "", map[string]string(nil)
	for path, u := range p.repos {
		if path != "" && (r.URL.Path == path || strings.HasPrefix(r.URL.Path, path+"/")) {
			repo, users = path, u
		}
	}
	if repo == "" {
		users = p.repos[""]
	}
	p.mu.Lock()
	isCheck := r.Method == http.MethodGet && r.URL.Query().Get("cmd") == "capabilities" && r.Header.Get("X-HgUpgrade-1") == ""
	if isCheck {
		p.checks[repo+" "+r.Header.Get("Authorization")]++
	}
	if strings.Contains(r.URL.Path, "/ro/") {
		p.commands[repo]++
	}
	p.mu.Unlock()
	if isCheck {
		time.Sleep(p.delay)
	}
	if users != nil {
		user, pass, ok := r.BasicAuth()
		if want, known := users[user]; !ok || !known || pass != want {
			w.Header().Set("WWW-Authenticate", `Basic realm="private repository"`)
			http.Error(w, "private origin: authorization required", http.StatusUnauthorized)
			return
		}
	}
	r2 := r.Clone(r.Context())
	r2.URL.Path = strings.TrimPrefix(r.URL.Path, repo)
	if r2.URL.Path == "" {
		r2.URL.Path = "/"
	}
	p.demo.ServeHTTP(w, r2)
}

func (p *privateOrigin) checksBy(repo string, h http.Header) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.checks[repo+" "+h.Get("Authorization")]
}

func (p *privateOrigin) commandsAt(repo string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.commands[repo]
}

func basicAuth(user, pass string) http.Header {
	r, _ := http.NewRequest(http.MethodGet, "http://x/", nil)
	r.SetBasicAuth(user, pass)
	return http.Header{"Authorization": r.Header["Authorization"]}
}

// logBuffer collects the stack's log lines.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) count(substr string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), substr)
}

// startBehind starts the stack in front of origin (the agent's configuration adjusted), logging
// into the returned buffer.
func startBehind(t *testing.T, origin string, adjust func(*agent.Config)) (*devstack.Stack, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	s, err := devstack.Start(context.Background(), devstack.Options{DataDir: t.TempDir(), OriginURL: origin,
		PlaceTimeout: time.Second, Log: slog.New(slog.NewTextHandler(logs, nil)), AgentConfig: adjust})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Close(ctx)
	})
	return s, logs
}

// wantOrigin401 fails unless the command got the origin's own 401, not a redirect or an answer.
func wantOrigin401(t *testing.T, who string, c *hgclient.Client, args map[string]any, rr *wire.RedirectRequest) {
	t.Helper()
	res, err := c.CommandNoFollow(context.Background(), "manifestdata", args, rr)
	if err == nil {
		t.Fatalf("%s got an answer (redirected: %v) from a private origin", who, res.Redirected)
	}
	if !strings.Contains(err.Error(), "HTTP 401") || !strings.Contains(err.Error(), "private origin: authorization required") {
		t.Fatalf("%s: %v, want the origin's 401", who, err)
	}
}

// A private origin's content reaches only the clients the origin serves: with the store holding
// the object (a client with credentials filled it and is redirected to it), a client without
// credentials and one with a wrong password still get the origin's 401, never a redirect.
func TestPrivateOriginRedirectsOnlyClientsItWouldServe(t *testing.T) {
	o := newPrivateOrigin(t, map[string]map[string]string{"": {"alice": "secret"}})
	s, _ := startBehind(t, o.URL, nil)
	ctx := context.Background()
	alice := &hgclient.Client{Base: s.AgentURL, Header: basicAuth("alice", "secret")}
	anonymous := &hgclient.Client{Base: s.AgentURL}
	wrong := &hgclient.Client{Base: s.AgentURL, Header: basicAuth("alice", "guess")}

	if _, err := anonymous.Capabilities(ctx); err == nil || !strings.Contains(err.Error(), "HTTP 401") {
		t.Fatalf("anonymous handshake: %v, want the origin's 401", err)
	}
	rr := redirectReq(t, alice)
	first, err := alice.Command(ctx, "manifestdata", args("p", 300000), rr)
	if err != nil || first.Redirected {
		t.Fatalf("first request with credentials: %v (redirected: %v)", err, first != nil && first.Redirected)
	}
	eventually(t, 5*time.Second, "a redirect for the client with credentials", func() bool {
		res, err := alice.Command(ctx, "manifestdata", args("p", 300000), rr)
		if err != nil {
			t.Fatal(err)
		}
		return res.Redirected && bytes.Equal(res.Objects, first.Objects)
	})
	if n := objectCount(t, s); n != 1 {
		t.Fatalf("the store holds %d objects, want the one filled", n)
	}

	before := o.commandsAt("")
	// Three times each: the later refusals come from the cache, and are refusals too.
	for range 3 {
		wantOrigin401(t, "a client without credentials", anonymous, args("p", 300000), rr)
		wantOrigin401(t, "a client with a wrong password", wrong, args("p", 300000), rr)
	}
	if got := o.commandsAt("") - before; got != 6 {
		t.Fatalf("%d of 6 refused requests reached the origin", got)
	}
	if got := outcomes(t, s, "origin_denied"); got != 6 {
		t.Fatalf("the agent counted %v requests refused by the origin, want 6", got)
	}
	// The client with credentials keeps its redirects.
	if res, err := alice.Command(ctx, "manifestdata", args("p", 300000), rr); err != nil || !res.Redirected {
		t.Fatalf("after the refusals, the client with credentials: %v", err)
	}
}

// The origin is asked once per credentials and TTL: concurrent first requests share one check,
// repeated requests reuse its answer, and the next check comes after the TTL. Each credential has
// its own answer.
func TestOriginChecksAreCachedPerCredentialsForTheTTL(t *testing.T) {
	const ttl = 3 * time.Second
	o := newPrivateOrigin(t, map[string]map[string]string{"": {"alice": "secret", "bob": "hunter2"}})
	o.delay = 300 * time.Millisecond // every concurrent first request arrives while the check runs
	s, _ := startBehind(t, o.URL, func(c *agent.Config) { c.OriginAuthTTL = ttl })
	ctx := context.Background()
	alice := &hgclient.Client{Base: s.AgentURL, Header: basicAuth("alice", "secret")}
	bob := &hgclient.Client{Base: s.AgentURL, Header: basicAuth("bob", "hunter2")}
	rr := redirectReq(t, alice)

	start := time.Now()
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := alice.Command(ctx, "manifestdata", args(string(rune('a'+i%4)), 20000), rr); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	for range 20 {
		if _, err := alice.Command(ctx, "manifestdata", args("a", 20000), rr); err != nil {
			t.Fatal(err)
		}
	}
	if time.Since(start) > ttl {
		t.Skipf("36 requests took %s, longer than the TTL: the machine is too slow for this test", time.Since(start))
	}
	if n := o.checksBy("", alice.Header); n != 1 {
		t.Fatalf("36 requests with one credential within the TTL sent %d checks to the origin, want 1", n)
	}
	// The agent advertises a public target, so it also asks once whether the repository refuses
	// anonymous clients (to warn); that answer is cached the same way.
	if n := o.checksBy("", http.Header{}); n != 1 {
		t.Fatalf("%d anonymous checks within the TTL, want 1", n)
	}
	if _, err := bob.Command(ctx, "manifestdata", args("a", 20000), rr); err != nil {
		t.Fatal(err)
	}
	if n := o.checksBy("", bob.Header); n != 1 {
		t.Fatalf("another credential sent %d checks, want its own 1", n)
	}
	if got := agentCount(t, s, "detour_agent_origin_checks_total", "result", "allowed"); got != 2 {
		t.Fatalf("metrics count %v allowed checks, want 2 (alice, bob)", got)
	}
	if got := agentCount(t, s, "detour_agent_origin_checks_total", "result", "denied"); got != 1 {
		t.Fatalf("metrics count %v denied checks, want 1 (anonymous)", got)
	}
	// 37 requests with credentials, each wanting two answers (its own, anonymous), three checks.
	if got := agentCount(t, s, "detour_agent_origin_check_hits_total", "result", "allowed", "denied"); got != 2*37-3 {
		t.Fatalf("metrics count %v answers without a check, want %d", got, 2*37-3)
	}

	time.Sleep(time.Until(start.Add(ttl + 500*time.Millisecond)))
	for range 5 {
		if _, err := alice.Command(ctx, "manifestdata", args("a", 20000), rr); err != nil {
			t.Fatal(err)
		}
	}
	if n := o.checksBy("", alice.Header); n != 2 {
		t.Fatalf("after the TTL, 5 requests made the total %d checks, want 2", n)
	}
}

// Access is per repository: an origin serving several repositories to different users (hgwebdir)
// refuses a client one of them, and the client gets no redirect there, although the origin
// admitted the same credentials to another repository and the store holds the object; and the
// same arguments in two repositories are two objects.
func TestAccessIsCheckedPerRepository(t *testing.T) {
	o := newPrivateOrigin(t, map[string]map[string]string{"/team-a": {"alice": "secret"}, "/team-b": {"bob": "hunter2"}})
	s, _ := startBehind(t, o.URL, nil)
	ctx := context.Background()
	aliceA := &hgclient.Client{Base: s.AgentURL + "team-a/", Header: basicAuth("alice", "secret")}
	aliceB := &hgclient.Client{Base: s.AgentURL + "team-b/", Header: basicAuth("alice", "secret")}
	bobB := &hgclient.Client{Base: s.AgentURL + "team-b/", Header: basicAuth("bob", "hunter2")}
	rr := redirectReq(t, aliceA)
	warm := func(who string, c *hgclient.Client) {
		t.Helper()
		if _, err := c.Command(ctx, "manifestdata", args("x", 300000), rr); err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, "a redirect for "+who, func() bool {
			res, err := c.Command(ctx, "manifestdata", args("x", 300000), rr)
			if err != nil {
				t.Fatal(err)
			}
			return res.Redirected
		})
	}
	warm("alice in team-a", aliceA)
	// bob's first request for the same arguments in team-b is answered by team-b's origin, not
	// redirected to what was filled from team-a.
	before := o.commandsAt("/team-b")
	res, err := bobB.Command(ctx, "manifestdata", args("x", 300000), rr)
	if err != nil || res.Redirected {
		t.Fatalf("bob's first request in team-b: %v (redirected to team-a's object: %v)", err, res != nil && res.Redirected)
	}
	if o.commandsAt("/team-b") == before {
		t.Fatal("bob's request did not reach team-b's origin")
	}
	warm("bob in team-b", bobB)
	if n := objectCount(t, s); n != 2 {
		t.Fatalf("the store holds %d objects, want one per repository", n)
	}
	// alice's credentials are good in team-a, not in team-b.
	res, err = aliceB.CommandNoFollow(ctx, "manifestdata", args("x", 300000), rr)
	if err == nil || !strings.Contains(err.Error(), "HTTP 401") {
		t.Fatalf("alice in a repository she may not read: %v (redirected: %v)", err, res != nil && res.Redirected)
	}
}

// An origin that requires credentials, with a target whose URLs anyone can fetch: the agent logs
// a warning once for the target, and `detourctl targets get` shows one. An origin that serves
// everyone raises neither, even for clients that send credentials.
func TestPublicTargetOfAPrivateOriginIsReported(t *testing.T) {
	ctx := context.Background()
	const agentWarning = "the origin requires credentials but this target's URLs are not signed"
	t.Run("private origin", func(t *testing.T) {
		o := newPrivateOrigin(t, map[string]map[string]string{"": {"alice": "secret"}})
		s, logs := startBehind(t, o.URL, nil)
		alice := &hgclient.Client{Base: s.AgentURL, Header: basicAuth("alice", "secret")}
		rr := redirectReq(t, alice)
		for i := range 5 {
			if _, err := alice.Command(ctx, "manifestdata", args(string(rune('a'+i)), 20000), rr); err != nil {
				t.Fatal(err)
			}
			wantOrigin401(t, "anonymous", &hgclient.Client{Base: s.AgentURL}, args("a", 20000), rr)
		}
		if n := logs.count(agentWarning); n != 1 {
			t.Fatalf("the agent warned %d times about the public target, want once", n)
		}
		if n := logs.count("target=" + s.Target().Name); n < 1 {
			t.Fatal("the warning does not name the target")
		}
		got, err := s.Admin.GetTarget(ctx, &pb.GetTargetRequest{Name: s.Target().Name})
		if err != nil {
			t.Fatal(err)
		}
		if len(got.Target.Warnings) != 1 || !strings.Contains(got.Target.Warnings[0], "not signed") {
			t.Fatalf("target warnings: %q", got.Target.Warnings)
		}
		list, err := s.Admin.ListTargets(ctx, &pb.ListTargetsRequest{})
		if err != nil || len(list.Targets) != 1 || len(list.Targets[0].Warnings) != 1 {
			t.Fatalf("listed targets do not carry the warning: %v %v", list, err)
		}
	})
	t.Run("public origin", func(t *testing.T) {
		s, logs := startBehind(t, newPrivateOrigin(t, map[string]map[string]string{}).URL, nil)
		alice := &hgclient.Client{Base: s.AgentURL, Header: basicAuth("alice", "secret")}
		rr := redirectReq(t, alice)
		if _, err := alice.Command(ctx, "manifestdata", args("a", 300000), rr); err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, "a redirect", func() bool {
			res, err := alice.Command(ctx, "manifestdata", args("a", 300000), rr)
			return err == nil && res.Redirected
		})
		if n := logs.count(agentWarning); n != 0 {
			t.Fatalf("the agent warned %d times although the origin serves everyone", n)
		}
		got, err := s.Admin.GetTarget(ctx, &pb.GetTargetRequest{Name: s.Target().Name})
		if err != nil || len(got.Target.Warnings) != 0 {
			t.Fatalf("target warnings for a public origin: %v %v", got, err)
		}
	})
}
