package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/front/hgv2"
	"github.com/detourhq/detour/internal/hgclient"
	"github.com/detourhq/detour/internal/testbed"
	"github.com/detourhq/detour/internal/wire"
)

func hashHex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// originCounts is how many times hg serve answered each command.
func (r *rig) originCounts() map[string]int {
	r.t.Helper()
	c, err := r.origin.Requests()
	r.must(err)
	return c
}

func (r *rig) agentMetric(name string, labels ...string) float64 {
	return testbed.Metric(r.t, r.agent.MetricsURL, name, labels...)
}

// waitFills waits until every fill the rig's agent started has been reported READY.
func (r *rig) waitFills() { r.waitFillsOf(r.agent) }

// waitFillsOf waits until every fill agent a started has been reported READY.
func (r *rig) waitFillsOf(a *testbed.Agent) {
	r.t.Helper()
	metric := func(name string, labels ...string) float64 { return testbed.Metric(r.t, a.MetricsURL, name, labels...) }
	testbed.Eventually(r.t, 60*time.Second, "every fill reported", func() bool {
		started := metric("detour_agent_requests_total", `outcome="inline_fill"`)
		done := metric("detour_agent_fills_total")
		if ready := metric("detour_agent_fills_total", `outcome="ready"`); done > ready {
			r.t.Fatalf("%v of %v fills did not become ready", done-ready, done)
		}
		return started > 0 && done >= started
	})
}

// TestRealMercurialClonesThroughAgent is the product's promise, checked with the only client that
// matters: a real Mercurial 5.6.1 cloning and pulling through the agent gets exactly what it gets
// from the origin, warm clones are served by redirects, and repository state (bookmarks, phases)
// is never served stale.
func TestRealMercurialClonesThroughAgent(t *testing.T) {
	r := newRig(t, fullRepo)
	ctx := context.Background()

	refDir, _ := r.clone(r.origin.URL)
	ref := r.state(refDir)

	// Cold: inline, and the store fills.
	cold, out := r.clone(r.agentTap.URL)
	if n := redirectsFollowed(out); n != 0 {
		t.Fatalf("cold clone followed %d redirects before anything was stored", n)
	}
	r.verify(cold)
	assertSame(t, "cold clone", ref, r.state(cold))
	r.waitFills()
	objects, err := r.admin.ListObjects(ctx, &pb.ListObjectsRequest{})
	r.must(err)
	if len(objects.Objects) < 2 {
		t.Fatalf("after a cold clone the index holds %d objects, want manifestdata and filesdata", len(objects.Objects))
	}

	// Warm: redirects, the origin computes no manifest or file data, and the clones are identical.
	for i := 0; i < 3; i++ {
		before, redirects := r.originCounts(), r.agentMetric("detour_agent_requests_total", `outcome="redirect"`)
		dir, out := r.clone(r.agentTap.URL)
		after := r.originCounts()
		if n := redirectsFollowed(out); n < 2 {
			t.Fatalf("warm clone %d followed %d redirects, want manifestdata and filesdata (%v)", i, n, commandsSent(out))
		}
		if got := r.agentMetric("detour_agent_requests_total", `outcome="redirect"`) - redirects; got < 2 {
			t.Fatalf("warm clone %d: the agent counted %v redirects", i, got)
		}
		for _, cmd := range []string{"manifestdata", "filesdata"} {
			if after[cmd] != before[cmd] {
				t.Fatalf("warm clone %d: the origin answered %s %d times", i, cmd, after[cmd]-before[cmd])
			}
		}
		r.verify(dir)
		assertSame(t, fmt.Sprintf("warm clone %d", i), ref, r.state(dir))
	}

	t.Run("stored objects are the origin's bytes", func(t *testing.T) { r.checkStoredObjects(t) })

	// Repository state moves on the origin after the cache is warm: the next clone sees it.
	t.Run("bookmark and phase changes reach the next clone", func(t *testing.T) {
		r.hgOrigin("bookmark", "--force", "--rev", "3", "feature")
		r.hgOrigin("bookmark", "--rev", "0", "release")
		r.hgOrigin("phase", "--public", "--rev", "2")
		refDir, _ := r.clone(r.origin.URL)
		want := r.state(refDir)
		if want == ref {
			t.Fatalf("moving a bookmark and a phase did not change what a clone shows")
		}
		dir, out := r.clone(r.agentTap.URL)
		if redirectsFollowed(out) < 2 {
			t.Fatalf("unchanged content was not redirected")
		}
		assertSame(t, "clone after bookmark/phase change", want, r.state(dir))
	})

	// New changesets land on the origin; existing clones pull them, cold then warm.
	t.Run("pull cold then warm", func(t *testing.T) {
		first, _ := r.clone(r.agentTap.URL)
		second, _ := r.clone(r.agentTap.URL)
		r.must(r.repo.Populate(7, 40, 1, 1200<<10))
		r.commit("new work")
		r.must(r.repo.WriteFile("src/dir03/file003.txt", []byte("rewritten\n")))
		r.commit("more work")
		r.hgOrigin("bookmark", "--force", "--rev", "tip", "feature")
		refDir, _ := r.clone(r.origin.URL)
		want := r.state(refDir)

		out, err := r.hgIn(first, "pull", "--update", "--debug")
		r.must(err)
		if redirectsFollowed(out) != 0 {
			t.Fatalf("cold pull followed redirects for content never stored")
		}
		r.verify(first)
		assertSame(t, "cold pull", want, r.state(first))
		r.waitFills()

		before := r.originCounts()
		out, err = r.hgIn(second, "pull", "--update", "--debug")
		r.must(err)
		after := r.originCounts()
		if redirectsFollowed(out) < 2 {
			t.Fatalf("warm pull followed %d redirects (%v)", redirectsFollowed(out), commandsSent(out))
		}
		if after["filesdata"] != before["filesdata"] || after["manifestdata"] != before["manifestdata"] {
			t.Fatalf("warm pull reached the origin for content: %v → %v", before, after)
		}
		r.verify(second)
		assertSame(t, "warm pull", want, r.state(second))
	})

	refDir, _ = r.clone(r.origin.URL)
	ref = r.state(refDir)

	// A client that does not support redirects sends no redirect map: inline answers.
	t.Run("client without redirect support gets inline answers", func(t *testing.T) {
		ext := filepath.Join(r.work, "noredirect.py")
		r.must(writeFile(ext, noRedirectExtension))
		before := r.originCounts()
		dir, out := r.clone(r.agentTap.URL, "--config", "extensions.noredirect="+ext)
		if redirectsFollowed(out) != 0 {
			t.Fatalf("a client without redirect support was redirected")
		}
		if r.originCounts()["filesdata"] == before["filesdata"] {
			t.Fatalf("filesdata did not reach the origin for a client without redirects")
		}
		r.verify(dir)
		assertSame(t, "clone without redirect support", ref, r.state(dir))
	})

	// Protocol v1 passes through the agent untouched.
	t.Run("protocol v1 client", func(t *testing.T) {
		dir := filepath.Join(r.work, "v1-clone")
		ctx, cancel := context.WithTimeout(context.Background(), hgTimeout(t))
		defer cancel()
		before := r.originCounts()
		out, err := runHG(ctx, r.hg, r.work, "clone", "--debug", r.agentTap.URL, dir)
		if err != nil {
			t.Fatalf("v1 clone: %v\n%s", err, tailLines(out, 30))
		}
		if after := r.originCounts(); after["getbundle"] == before["getbundle"] {
			t.Fatalf("a v1 clone did not use getbundle: %v", after)
		}
		if redirectsFollowed(out) != 0 || len(commandsSent(out)) != 0 {
			t.Fatalf("a v1 clone spoke protocol v2")
		}
		r.verify(dir)
		assertSame(t, "v1 clone", ref, r.state(dir))
	})
}

// TestRealMercurialClonesWhileTheStoreFails: when the target's client-facing URL stops serving
// (a bucket made private answers 403, the store is unreachable), the control plane's prober takes
// the target out within its detection time, and real clones keep succeeding inline, identical to
// the origin's; when the URL serves again, redirects come back.
func TestRealMercurialClonesWhileTheStoreFails(t *testing.T) {
	r := newRig(t, repoShape{files: 60, bigFiles: 2, bigSize: 1200 << 10})
	refDir, _ := r.clone(r.origin.URL)
	ref := r.state(refDir)
	r.clone(r.agentTap.URL)
	r.waitFills()
	if _, out := r.clone(r.agentTap.URL); redirectsFollowed(out) < 2 {
		t.Fatalf("warm clone before the fault followed %d redirects", redirectsFollowed(out))
	}
	// The control plane's default probing: 3 failures 2s apart, plus a probe timeout.
	const detection = 10 * time.Second
	for _, fault := range []struct {
		name   string
		inject func()
	}{
		{"bucket not public (HTTP 403)", func() { r.front.Fail(http.StatusForbidden) }},
		{"store unreachable", r.front.Unreachable},
	} {
		t.Run(fault.name, func(t *testing.T) {
			fault.inject()
			start := time.Now()
			testbed.Eventually(t, detection+5*time.Second, "the agent stops advertising the failing target", func() bool {
				return !r.advertises(target)
			})
			t.Logf("%s: target withdrawn after %s", fault.name, time.Since(start).Round(100*time.Millisecond))
			if took := time.Since(start); took > detection {
				t.Fatalf("the failing target was withdrawn after %s, the documented detection time is %s", took, detection)
			}
			before := r.originCounts()
			dir, out := r.clone(r.agentTap.URL)
			if n := redirectsFollowed(out); n != 0 {
				t.Fatalf("a clone followed %d redirects to a failing store", n)
			}
			if r.originCounts()["filesdata"] == before["filesdata"] {
				t.Fatal("filesdata did not come from the origin while the store failed")
			}
			r.verify(dir)
			assertSame(t, "clone while the store fails", ref, r.state(dir))

			r.front.Heal()
			testbed.Eventually(t, detection+5*time.Second, "the healed target advertised again", func() bool {
				return r.advertises(target)
			})
			dir, out = r.clone(r.agentTap.URL)
			if n := redirectsFollowed(out); n < 2 {
				t.Fatalf("after the store healed a clone followed %d redirects", n)
			}
			assertSame(t, "clone after the store healed", ref, r.state(dir))
		})
	}
}

// checkStoredObjects replays every manifestdata and filesdata request a client sent through the
// agent to the origin directly, and checks that the object stored under its content key holds
// exactly the bytes the origin answers inline.
func (r *rig) checkStoredObjects(t *testing.T) {
	ctx := context.Background()
	origin := &hgclient.Client{Base: r.origin.URL}
	checked := 0
	for _, name := range []string{"manifestdata", "filesdata"} {
		seen := map[string]bool{}
		for _, body := range r.agentTap.Requests(name) {
			rs, err := wire.ReadRequest(bytes.NewReader(body), wire.ReaderOptions{})
			r.must(err)
			cmd := rs.Commands[0]
			key, err := hgv2.ContentKey(repoID, cmd)
			r.must(err)
			if seen[key] {
				continue
			}
			seen[key] = true
			list, err := r.admin.ListObjects(ctx, &pb.ListObjectsRequest{KeyPrefix: key})
			r.must(err)
			if len(list.Objects) != 1 {
				t.Fatalf("%s key %s: %d stored objects", name, key[:12], len(list.Objects))
			}
			stored, err := r.gcs.Object(bucket, list.Objects[0].ObjectName)
			r.must(err)
			inline, err := origin.Command(ctx, name, cmd.Args, nil)
			r.must(err)
			if !bytes.Equal(stored, inline.Objects) {
				t.Fatalf("%s key %s: stored %d bytes differ from the origin's %d inline bytes", name, key[:12], len(stored), len(inline.Objects))
			}
			if name == "filesdata" && len(stored) < 10<<20 {
				t.Fatalf("filesdata is %d bytes; the test repository should make it over 10 MB", len(stored))
			}
			checked++
		}
	}
	if checked < 2 {
		t.Fatalf("checked %d stored objects, want at least manifestdata and filesdata", checked)
	}
}

// noRedirectExtension makes a real client behave as one without content-redirect support: it
// sends no redirect map.
const noRedirectExtension = `from mercurial import wireprotov2peer

def extsetup(ui):
    wireprotov2peer.supportedredirects = lambda ui, apidescriptor: None
`
