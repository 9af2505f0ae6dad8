package devstack

import (
	"context"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/hgclient"
	"github.com/detourhq/detour/internal/testbed"
	"github.com/detourhq/detour/internal/wire"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func start(t *testing.T, dir string) *Stack {
	t.Helper()
	s, err := Start(context.Background(), Options{DataDir: dir, StoreDir: filepath.Join(dir, "gcs"), ObjectSize: 64 << 10, Log: quiet,
		// Content keys name the repository; the demo origin's port changes with each start.
		RepoID: "devstack-test"})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func stop(s *Stack) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s.Close(ctx)
}

func args(node string) map[string]any {
	return map[string]any{"nodes": []any{strings.Repeat(node, 20)[:20]}, "tree": "", "size": 100000}
}

// ask sends a redirect-capable request for node and returns the answer, its bytes checked against
// the location's hashes when redirected.
func ask(t *testing.T, s *Stack, node string) *hgclient.Result {
	t.Helper()
	c := &hgclient.Client{Base: s.AgentURL}
	res, err := c.Command(context.Background(), "manifestdata", args(node),
		&wire.RedirectRequest{Targets: []string{s.Target().Name}, Hashes: []string{"sha256", "sha1"}})
	if err != nil {
		t.Fatalf("%s: %v", node, err)
	}
	return res
}

// locationOf asks without following the redirect and returns its URL ("" if answered inline).
func locationOf(t *testing.T, s *Stack, node string) string {
	t.Helper()
	c := &hgclient.Client{Base: s.AgentURL}
	res, err := c.CommandNoFollow(context.Background(), "manifestdata", args(node),
		&wire.RedirectRequest{Targets: []string{s.Target().Name}, Hashes: []string{"sha256", "sha1"}})
	if err != nil || !res.Redirected {
		return ""
	}
	return res.Status.Location.URL
}

// `make run` stopped and started again keeps its store (fake-gcs-server's filesystem backend under
// the data dir): what it stored is redirected to at once, the same generation, without a refill.
// An object that went away while it was stopped (here: its file removed, which no notification
// reports) is not redirected to: the restarted control plane checks records before redirecting.
func TestRestartedStackKeepsRedirectingWithoutRefilling(t *testing.T) {
	dir := t.TempDir()
	s := start(t, dir)
	stored := map[string]string{}
	for _, node := range []string{"kept", "lost"} {
		if ask(t, s, node).Redirected {
			t.Fatalf("%s: redirected before anything was stored", node)
		}
		testbed.Eventually(t, 10*time.Second, node+" redirected", func() bool {
			stored[node] = locationOf(t, s, node)
			return stored[node] != ""
		})
	}
	stop(s)

	u, err := url.Parse(stored["lost"])
	if err != nil {
		t.Fatal(err)
	}
	// /<bucket>/<object name>: the emulator keeps <dir>/gcs/objects/<bucket>/<object name>.
	if err := os.Remove(filepath.Join(dir, "gcs", "objects", filepath.FromSlash(strings.TrimPrefix(u.Path, "/")))); err != nil {
		t.Fatal(err)
	}

	s = start(t, dir)
	defer stop(s)
	first := ask(t, s, "kept")
	if !first.Redirected {
		t.Fatal("the first request after the restart was answered inline: the stored object was not redirected to")
	}
	// The same object and generation (the emulator's port is another each start).
	if loc := locationOf(t, s, "kept"); pathOf(loc) != pathOf(stored["kept"]) {
		t.Fatalf("after the restart the location is %s, before it was %s (a refill?)", loc, stored["kept"])
	}
	// The lost object: answered inline with the origin's bytes (the client checks nothing), never
	// redirected to the missing object, and stored again.
	if res := ask(t, s, "lost"); res.Redirected && pathOf(res.Status.Location.URL) == pathOf(stored["lost"]) {
		t.Fatal("redirected to an object that is gone")
	}
	testbed.Eventually(t, 10*time.Second, "the lost key stored again", func() bool {
		loc := locationOf(t, s, "lost")
		return loc != "" && pathOf(loc) != pathOf(stored["lost"])
	})
	ask(t, s, "lost") // fetched and checked against the location's hashes
}

// pathOf is a location's path and query: the object and its generation.
func pathOf(loc string) string {
	u, err := url.Parse(loc)
	if err != nil {
		return loc
	}
	return u.RequestURI()
}
