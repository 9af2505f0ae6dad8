package hgv2

import (
	"bytes"
	"fmt"
	"net/http"
	"slices"
	"testing"

	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/wire"
)

// discardWriter is an http.ResponseWriter that keeps nothing: the benchmark measures the agent's
// work, not a recorder's.
type discardWriter struct{ h http.Header }

func (d *discardWriter) Header() http.Header         { return d.h }
func (d *discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (d *discardWriter) WriteHeader(int)             {}

// manifestRequest is a framed manifestdata request as Mercurial 5.6.1 sends it during a clone
// (fields, haveparents, nodes, tree) for n manifests, accepting two targets.
func manifestRequest(tb testing.TB, n int) []byte {
	nodes := make([]any, n)
	for i := range nodes {
		nodes[i] = fmt.Sprintf("%020d", i)
	}
	var buf bytes.Buffer
	w := wire.NewRequestWriter(&buf)
	if err := w.WriteSettings(wire.EncodingIdentity); err != nil {
		tb.Fatal(err)
	}
	if err := w.WriteCommand(&wire.CommandRequest{RequestID: 1, Name: "manifestdata",
		Args:     map[string]any{"fields": wire.Set("parents", "revision"), "haveparents": true, "nodes": nodes, "tree": ""},
		Redirect: &wire.RedirectRequest{Targets: []string{"us-gcs", "eu-gcs"}, Hashes: []string{"sha256", "sha1"}}}); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// BenchmarkRedirectHitWork is the agent's own work for a request answered from the location
// cache, without net/http and the origin check: read and assemble the frames, decide
// cacheability, derive the content key, write the prepared redirect.
func BenchmarkRedirectHitWork(b *testing.B) {
	loc := &agent.Location{Target: "us-gcs", URL: "https://storage.googleapis.com/detour-us/hg/" + fmt.Sprintf("%064x", 1), MediaType: wire.MediaTypeCBOR,
		Size: 123456, SHA256: bytes.Repeat([]byte{1}, 32), SHA1: bytes.Repeat([]byte{2}, 20)}
	f := &Front{}
	prepared, err := f.redirectAnswer([]string{"sha256", "sha1"}, loc)
	if err != nil {
		b.Fatal(err)
	}
	for _, n := range []int{1, 100} {
		body := manifestRequest(b, n)
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			w := &discardWriter{h: http.Header{}}
			b.ReportAllocs()
			for b.Loop() {
				rs, err := wire.ReadRequest(bytes.NewReader(body), wire.ReaderOptions{MaxTotal: 1 << 20})
				if err != nil {
					b.Fatal(err)
				}
				cmd := rs.Commands[0]
				if ok, why := Cacheability(cmd); !ok {
					b.Fatal(why)
				}
				if _, err := ContentKeyAt("repo", "", cmd); err != nil {
					b.Fatal(err)
				}
				if !slices.Equal(cmd.Redirect.Hashes, []string{"sha256", "sha1"}) {
					b.Fatal("hashes differ")
				}
				writeRedirect(w, cmd.RequestID, prepared)
			}
		})
	}
}
