package hgclient

import (
	"context"
	"crypto/sha256"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/detourhq/detour/internal/wire"
)

// server answers every command with the frames write produces and serves the location body.
func server(t *testing.T, write func(w *wire.ResponseWriter, loc *wire.Location) error) *httptest.Server {
	t.Helper()
	body := []byte{0xa1, 0x4a, 't', 'o', 't', 'a', 'l', 'i', 't', 'e', 'm', 's', 0x00}
	sum := sha256.Sum256(body)
	size := uint64(len(body))
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/object" {
			w.Header().Set("Content-Type", wire.MediaTypeCBOR)
			w.Write(body)
			return
		}
		w.Header().Set("Content-Type", wire.MediaTypeFraming)
		loc := &wire.Location{URL: srv.URL + "/object", MediaType: wire.MediaTypeCBOR, Size: &size,
			FullHashes: [][]string{{"sha256", string(sum[:])}}}
		if err := write(wire.NewResponseWriter(w, wire.DefaultMaxPayload), loc); err != nil {
			t.Error(err)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

var rr = &wire.RedirectRequest{Targets: []string{"t"}, Hashes: []string{"sha256"}}

func TestFollowsRedirectEndingInItsOwnFrame(t *testing.T) {
	srv := server(t, func(w *wire.ResponseWriter, loc *wire.Location) error { return w.WriteRedirect(1, loc) })
	res, err := (&Client{Base: srv.URL}).Command(context.Background(), "filesdata", nil, rr)
	if err != nil || !res.Redirected || len(res.Objects) != 13 || strings.Join(res.Verified, ",") != "sha256" {
		t.Fatalf("res %+v, err %v", res, err)
	}
}

// The framing of Detour's first version: status and end-of-stream in separate frames. Mercurial's
// client cuts the fetched body short on it; this client refuses it.
func TestRejectsRedirectFollowedBySeparateEOS(t *testing.T) {
	srv := server(t, func(w *wire.ResponseWriter, loc *wire.Location) error {
		if err := w.WriteStreamSettings(1, wire.EncodingIdentity); err != nil {
			return err
		}
		if err := w.WriteValue(1, wire.Status{Status: wire.StatusRedirect, Location: loc}); err != nil {
			return err
		}
		return w.WriteEOS(1)
	})
	_, err := (&Client{Base: srv.URL}).Command(context.Background(), "filesdata", nil, rr)
	if !errors.Is(err, wire.ErrFrameAfterRedirect) {
		t.Fatalf("err = %v, want ErrFrameAfterRedirect", err)
	}
}

func TestRejectsFramesAfterRedirectEOS(t *testing.T) {
	srv := server(t, func(w *wire.ResponseWriter, loc *wire.Location) error {
		if err := w.WriteRedirect(1, loc); err != nil {
			return err
		}
		return w.WriteValue(1, wire.Map{"extra": 1})
	})
	_, err := (&Client{Base: srv.URL}).Command(context.Background(), "filesdata", nil, rr)
	if !errors.Is(err, wire.ErrFrameAfterRedirect) {
		t.Fatalf("err = %v, want ErrFrameAfterRedirect", err)
	}
}

func TestRefusesOtherLocationMediaTypes(t *testing.T) {
	srv := server(t, func(w *wire.ResponseWriter, loc *wire.Location) error {
		loc.MediaType = "application/octet-stream"
		return w.WriteRedirect(1, loc)
	})
	_, err := (&Client{Base: srv.URL}).Command(context.Background(), "filesdata", nil, rr)
	if err == nil || !strings.Contains(err.Error(), "media type") {
		t.Fatalf("err = %v", err)
	}
}

func TestRedirectToClientWithoutRedirectMapIsAnError(t *testing.T) {
	srv := server(t, func(w *wire.ResponseWriter, loc *wire.Location) error { return w.WriteRedirect(1, loc) })
	_, err := (&Client{Base: srv.URL}).Command(context.Background(), "filesdata", nil, nil)
	if err == nil || !strings.Contains(err.Error(), "no redirect map") {
		t.Fatalf("err = %v", err)
	}
}

// Credentials in Header go to the repository's server, never to the location, another server.
func TestHeaderGoesToTheServerNotToTheLocation(t *testing.T) {
	var mu sync.Mutex
	seen := map[string]string{}
	srv := server(t, func(w *wire.ResponseWriter, loc *wire.Location) error { return w.WriteRedirect(1, loc) })
	inner := srv.Config.Handler
	srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen[r.URL.Path] = r.Header.Get("Authorization")
		mu.Unlock()
		inner.ServeHTTP(w, r)
	})
	c := &Client{Base: srv.URL, Header: http.Header{"Authorization": {"Basic YTpi"}}}
	if _, err := c.Command(context.Background(), "filesdata", nil, rr); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if got := seen["/api/"+wire.APIVersion+"/ro/filesdata"]; got != "Basic YTpi" {
		t.Fatalf("the command request carried Authorization %q", got)
	}
	if got, ok := seen["/object"]; !ok || got != "" {
		t.Fatalf("the location fetch carried Authorization %q (fetched: %v)", got, ok)
	}
}
