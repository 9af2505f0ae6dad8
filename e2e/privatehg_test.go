package e2e

import (
	"net/url"
	"path/filepath"
	"strings"
	"testing"
)

// withUser returns u with credentials in it, as a user writes them for hg.
func withUser(t testing.TB, u, user, pass string) string {
	t.Helper()
	p, err := url.Parse(u)
	if err != nil {
		t.Fatal(err)
	}
	p.User = url.UserPassword(user, pass)
	return p.String()
}

// TestRealMercurialClonesAPrivateRepositoryOnlyWithCredentials: hg serve behind HTTP basic
// authentication. A real Mercurial client with credentials in the URL clones through the agent,
// cold (inline, filling the store) and warm (redirects), identical to the origin's clone; without
// credentials or with a wrong password the clone fails with the origin's 401, also once the store
// holds every object the clone needs.
func TestRealMercurialClonesAPrivateRepositoryOnlyWithCredentials(t *testing.T) {
	r := newRigWith(t, repoShape{files: 60, bigFiles: 2, bigSize: 1200 << 10}, rigOptions{users: map[string]string{"alice": "s3cret"}})
	refDir, _ := r.clone(r.origin.URL)
	ref := r.state(refDir)
	alice := withUser(t, r.agentTap.URL, "alice", "s3cret")

	refused := 0
	refuse := func(what, u string) {
		t.Helper()
		refused++
		before := r.authProxy.refused.Load()
		dir := filepath.Join(r.work, "refused-"+string(rune('a'+refused)))
		out, err := r.hgIn(r.work, "clone", "--debug", "--config", "ui.interactive=false", u, dir)
		if err == nil {
			t.Fatalf("%s: the clone succeeded\n%s", what, tailLines(out, 20))
		}
		if !strings.Contains(err.Error(), "authorization") {
			t.Fatalf("%s: the clone failed, but not for authorization: %v\n%s", what, err, tailLines(out, 20))
		}
		for _, line := range strings.Split(err.Error(), "\n") {
			if strings.HasPrefix(line, "abort:") {
				t.Logf("%s: %s", what, line)
			}
		}
		if n := redirectsFollowed(out); n != 0 {
			t.Fatalf("%s: the client followed %d redirects", what, n)
		}
		if r.authProxy.refused.Load() == before {
			t.Fatalf("%s: the origin refused nothing; the 401 did not come from the origin", what)
		}
	}

	refuse("no credentials, cold", r.agentTap.URL)
	cold, out := r.clone(alice)
	if n := redirectsFollowed(out); n != 0 {
		t.Fatalf("cold clone followed %d redirects before anything was stored", n)
	}
	r.verify(cold)
	assertSame(t, "cold clone with credentials", ref, r.state(cold))
	r.waitFills()

	warm, out := r.clone(alice)
	if n := redirectsFollowed(out); n < 2 {
		t.Fatalf("warm clone with credentials followed %d redirects, want manifestdata and filesdata (%v)", n, commandsSent(out))
	}
	r.verify(warm)
	assertSame(t, "warm clone with credentials", ref, r.state(warm))

	refuse("no credentials, warm", r.agentTap.URL)
	refuse("wrong password, warm", withUser(t, r.agentTap.URL, "alice", "guess"))

	if n := r.agentMetric("detour_agent_origin_checks_total", `result="allowed"`); n < 1 {
		t.Fatalf("the agent sent %v allowed checks to the origin", n)
	}
	if n := r.agentMetric("detour_agent_origin_checks_total", `result="denied"`); n < 1 {
		t.Fatalf("the agent sent %v denied checks to the origin", n)
	}
	// The target's URLs are public: the agent says so, once.
	if n := strings.Count(r.agent.Output(), "URLs are not signed"); n != 1 {
		t.Fatalf("the agent warned %d times about a public target of a private origin, want once", n)
	}
	// Mercurial's client, once authenticated, sends its Authorization header with every request
	// it makes, including the location fetches: a target sees the repository's credentials.
	t.Logf("location fetches carrying the client's Authorization header: %d", r.locationAuth.Load())
}
