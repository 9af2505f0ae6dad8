package e2e

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// heldTail is a request body whose reads past its declared length wait until release is closed
// (or a few seconds have passed): what a busy machine does to the transport's last read of a
// body it has sent, which checks that there is no more. done is closed once that read returned.
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

// heldTailTransport sends requests with heldTail bodies.
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

// The rigs' authenticating proxy relays the whole of a streamed answer to a command even when its
// transport's last read of the command's body comes after the answer has started (as it did on a
// loaded CI machine, where the cut answer left a real Mercurial client waiting forever).
func TestAuthProxyRelaysTheWholeAnswerWhenTheBodyIsReadLate(t *testing.T) {
	first, rest := bytes.Repeat([]byte("a"), 4<<10), bytes.Repeat([]byte("b"), 256<<10)
	clientHasFirst, tailRead := make(chan struct{}), make(chan struct{})
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(r.Body); err != nil {
			t.Errorf("upstream reading the body: %v", err)
			return
		}
		_, _ = w.Write(first)
		w.(http.Flusher).Flush()
		select {
		case <-tailRead:
		case <-time.After(5 * time.Second):
		}
		_, _ = w.Write(rest)
	}))
	defer upstream.Close()
	p := newAuthProxy(t, upstream.URL, map[string]string{"alice": "s3cret"})
	p.proxy.Transport = &heldTailTransport{RoundTripper: http.DefaultTransport.(*http.Transport).Clone(),
		release: clientHasFirst, done: tailRead}

	req, err := http.NewRequest(http.MethodPost, p.URL+"api/exp-http-v2-0003/ro/filesdata", bytes.NewReader(bytes.Repeat([]byte("x"), 2<<10)))
	if err != nil {
		t.Fatal(err)
	}
	req.SetBasicAuth("alice", "s3cret")
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
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
