package agent_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/agent"
)

// heldTail is a request body whose reads past its declared length wait until release is closed:
// the relay's transport, having sent the whole body, reads once more to check that there is no
// more, and on a busy machine that read can come late, after the origin has answered and the
// answer has started on its way to the client. done is closed once that read has returned.
type heldTail struct {
	io.ReadCloser
	left    int64
	release <-chan struct{}
	done    chan struct{}
	once    *sync.Once
}

func (h *heldTail) Read(p []byte) (int, error) {
	if h.left > 0 {
		n, err := h.ReadCloser.Read(p[:min(int64(len(p)), h.left)])
		h.left -= int64(n)
		return n, err
	}
	select {
	case <-h.release:
	case <-time.After(5 * time.Second):
	}
	defer h.once.Do(func() { close(h.done) })
	return h.ReadCloser.Read(p)
}

type heldTailTransport struct {
	http.RoundTripper
	release <-chan struct{}
	done    chan struct{}
	once    sync.Once
}

func (t *heldTailTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.ContentLength > 0 {
		req = req.Clone(req.Context())
		req.Body = &heldTail{ReadCloser: req.Body, left: req.ContentLength, release: t.release, done: t.done, once: &t.once}
	}
	return t.RoundTripper.RoundTrip(req)
}

// A relayed request with a body (a push, say) gets the origin's whole answer even when the
// transport's last read of the body comes after the answer has started: the server must not have
// drained and closed the body under it, which made that read fail and cut the origin connection,
// and with it the client's answer, mid-stream (golang.org/issue/40747). The agent is safe because
// the http.MaxBytesReader it wraps every body in remembers the end of the body; without it this
// test fails, and the relay would need http.ResponseController.EnableFullDuplex.
func TestRelayedAnswerIsNotCutByALateReadOfTheRequestBody(t *testing.T) {
	first, rest := bytes.Repeat([]byte("a"), 4<<10), bytes.Repeat([]byte("b"), 256<<10)
	clientHasFirst, tailRead := make(chan struct{}), make(chan struct{})
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(r.Body); err != nil {
			t.Errorf("origin reading the body: %v", err)
			return
		}
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(first)
		w.(http.Flusher).Flush()
		select {
		case <-tailRead:
		case <-time.After(5 * time.Second):
		}
		_, _ = w.Write(rest)
	}))
	defer origin.Close()

	u, _ := url.Parse(origin.URL)
	a, err := agent.New(context.Background(), agent.Config{Origin: u, Log: quiet,
		Transport: &heldTailTransport{RoundTripper: http.DefaultTransport.(*http.Transport).Clone(), release: clientHasFirst, done: tailRead}})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go a.Serve(lis)
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = a.Shutdown(ctx)
	}()

	client := &http.Client{Timeout: 30 * time.Second}
	resp, err := client.Post("http://"+lis.Addr().String()+"/?cmd=unbundle", "application/mercurial-0.1", bytes.NewReader(bytes.Repeat([]byte("x"), 10<<10)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got := make([]byte, len(first))
	if _, err := io.ReadFull(resp.Body, got); err != nil {
		t.Fatalf("the answer's first bytes: %v", err)
	}
	close(clientHasFirst)
	tail, err := io.ReadAll(resp.Body)
	if err != nil || !bytes.Equal(tail, rest) {
		t.Fatalf("the answer was cut after %d of %d bytes: %v", len(got)+len(tail), len(first)+len(rest), err)
	}
}
