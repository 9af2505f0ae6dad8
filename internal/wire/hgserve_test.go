package wire

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/hgserve"
)

// findHG returns the real Mercurial 5.6.1, skipping the test when it is absent outside CI and
// failing it in CI, where `make hg` installs it.
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

// postCommand sends one command to a v2 server with the given encoding offer and returns the
// response body.
func postCommand(t *testing.T, ctx context.Context, base string, encodings []string, req *CommandRequest) []byte {
	t.Helper()
	var body bytes.Buffer
	w := NewRequestWriter(&body)
	if err := w.WriteSettings(encodings...); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteCommand(req); err != nil {
		t.Fatal(err)
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"api/"+APIVersion+"/ro/"+req.Name, &body)
	if err != nil {
		t.Fatal(err)
	}
	hr.Header.Set("Content-Type", MediaTypeFraming)
	hr.Header.Set("Accept", MediaTypeFraming)
	resp, err := http.DefaultClient.Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != MediaTypeFraming {
		t.Fatalf("%s: HTTP %d %s: %v: %.200s", req.Name, resp.StatusCode, resp.Header.Get("Content-Type"), err, b)
	}
	return b
}

// settingsOf returns the encoding a response's stream-settings frame names, "" without one.
func settingsOf(t *testing.T, frames []byte) string {
	fr := NewReader(bytes.NewReader(frames), ReaderOptions{Side: ClientSide, MaxTotal: -1})
	for {
		f, err := fr.Next()
		if err == io.EOF {
			return ""
		}
		if err != nil {
			t.Fatal(err)
		}
		if f.Type == TypeStreamSettings {
			var s string
			if _, err := UnmarshalFirst(f.Payload, &s); err != nil {
				t.Fatal(err)
			}
			return s
		}
	}
}

func objectsOf(t *testing.T, frames []byte) []byte {
	t.Helper()
	r, err := ReadResponse(bytes.NewReader(frames), 1, ReaderOptions{MaxPayload: MaxPayloadLimit})
	if err != nil {
		t.Fatal(err)
	}
	if r.Status().Status != StatusOK {
		t.Fatalf("status %+v", r.Status())
	}
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// A real `hg serve` (5.6.1, pure Python: zlib but no zstd) answers manifestdata and filesdata
// with the encoding it picks from an offer; decoded, the objects are byte for byte the identity
// answer's, which is what a redirect serves.
func TestRealServerEncodedAnswersDecodeToIdentity(t *testing.T) {
	hg := findHG(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	repo, err := hgserve.Init(ctx, hg, filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := repo.Populate(uint64(i+1), 40, 1, 300<<10); err != nil {
			t.Fatal(err)
		}
		if err := repo.Commit(ctx, fmt.Sprintf("changeset %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	out, err := repo.Hg(ctx, "log", "-r", "0:tip", "-T", `{node} {manifest % "{node}"}\n`)
	if err != nil {
		t.Fatal(err)
	}
	var csets, manifests []any
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		c, _ := hex.DecodeString(f[0])
		m, _ := hex.DecodeString(f[1])
		csets, manifests = append(csets, string(c)), append(manifests, string(m))
	}
	srv, err := hgserve.Serve(ctx, hg, repo.Dir, hgserve.Options{V2: true})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()

	commands := []*CommandRequest{
		{RequestID: 1, Name: "manifestdata", Args: map[string]any{"tree": "", "nodes": manifests,
			"fields": Set("parents", "revision"), "haveparents": true}},
		{RequestID: 1, Name: "filesdata", Args: map[string]any{
			"revisions": []any{Map{"type": "changesetexplicit", "nodes": csets}},
			"fields":    Set("parents", "revision"), "haveparents": true}},
	}
	for _, cmd := range commands {
		t.Run(cmd.Name, func(t *testing.T) {
			identity := postCommand(t, ctx, srv.URL, []string{EncodingIdentity}, cmd)
			want := objectsOf(t, identity)
			if len(want) < 4<<10 {
				t.Fatalf("identity answer has only %d object bytes", len(want))
			}
			for _, c := range []struct {
				offer  []string
				picked string
			}{
				// What the agent offers for a client that has zstd; the pure-Python server has none.
				{UpstreamEncodings([]string{"zstd-8mb", "zlib", "identity"}), EncodingZlib},
				{[]string{EncodingZlib}, EncodingZlib},
				// A client that offered only zstd-8mb: the agent adds identity, which the server
				// picks (offered zstd-8mb alone, 5.6.1 without zstd fails the command).
				{UpstreamEncodings([]string{EncodingZstd8MB}), EncodingIdentity},
			} {
				frames := postCommand(t, ctx, srv.URL, c.offer, cmd)
				if got := settingsOf(t, frames); got != c.picked {
					t.Fatalf("offer %q: server picked %q, want %q", c.offer, got, c.picked)
				}
				if got := objectsOf(t, frames); !bytes.Equal(got, want) {
					t.Fatalf("offer %q: %d decoded object bytes differ from identity's %d", c.offer, len(got), len(want))
				}
				if c.picked == EncodingZlib && len(frames) >= len(identity) {
					t.Errorf("zlib answer %d bytes, identity %d", len(frames), len(identity))
				}
				t.Logf("offer %q: %d response bytes, identity %d, %d object bytes", c.offer, len(frames), len(identity), len(want))
			}
		})
	}
}
