package testbed

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// ServeProxy serves r through proxy with the request body left to the proxy's transport (full
// duplex). By default an HTTP/1 server drains and closes a request's body once the answer's
// header goes out; a proxy's transport that reads the body once more after sending all of it (to
// check there is no more) then fails, and cuts the upstream answer mid-stream
// (golang.org/issue/40747). On a busy machine that read comes late often enough to make tests
// flaky; every test proxy that forwards bodies serves through this.
func ServeProxy(w http.ResponseWriter, r *http.Request, proxy http.Handler) {
	_ = http.NewResponseController(w).EnableFullDuplex()
	proxy.ServeHTTP(w, r)
}

// LateBodyRead reproduces, for a proxy under test, what a busy machine does to a proxied request
// with a body (golang.org/issue/40747): the proxy's transport, having sent the whole body, reads
// it once more to check that there is no more, and that read comes after the upstream has
// answered and the answer is on its way. A server that drained and closed the body when the
// answer's header went out makes that read fail, and the transport then cuts the upstream answer.
//
// Point the proxy at Upstream through Transport, then call Check with a request to the proxy.
type LateBodyRead struct {
	Upstream  *httptest.Server
	Transport http.RoundTripper

	first, rest   []byte
	release, tail chan struct{}
	once          sync.Once
	held          atomic.Bool // a late read waited for the client's first bytes
}

// NewLateBodyRead starts an upstream that reads the body, answers 4 KiB, and sends the rest
// (256 KiB) only once the transport's late read has returned.
func NewLateBodyRead(t testing.TB) *LateBodyRead {
	l := &LateBodyRead{first: bytes.Repeat([]byte("a"), 4<<10), rest: bytes.Repeat([]byte("b"), 256<<10),
		release: make(chan struct{}), tail: make(chan struct{})}
	l.Upstream = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(r.Body); err != nil {
			t.Errorf("upstream reading the body: %v", err)
			return
		}
		_, _ = w.Write(l.first)
		w.(http.Flusher).Flush()
		select {
		case <-l.tail:
		case <-time.After(5 * time.Second):
		}
		_, _ = w.Write(l.rest)
	}))
	t.Cleanup(l.Upstream.Close)
	l.Transport = lateTransport{RoundTripper: http.DefaultTransport.(*http.Transport).Clone(), l: l}
	return l
}

// Check sends req (with a body) and fails the test unless the whole answer arrives, the late read
// being held until the client has the answer's first bytes.
func (l *LateBodyRead) Check(t testing.TB, req *http.Request) {
	t.Helper()
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got := make([]byte, len(l.first))
	if _, err := io.ReadFull(resp.Body, got); err != nil {
		t.Fatalf("the answer's first bytes: %v", err)
	}
	close(l.release)
	tail, err := io.ReadAll(resp.Body)
	if err != nil || !bytes.Equal(tail, l.rest) {
		t.Fatalf("the answer was cut after %d of %d bytes: %v", len(got)+len(tail), len(l.first)+len(l.rest), err)
	}
	if !l.held.Load() {
		t.Fatal("the transport never read past the body once the answer had begun: nothing was tested")
	}
}

// lateTransport holds the read past a request body's declared length until the client has the
// answer's first bytes (or a few seconds have passed).
type lateTransport struct {
	http.RoundTripper
	l *LateBodyRead
}

func (t lateTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.ContentLength > 0 {
		req = req.Clone(req.Context())
		req.Body = &lateBody{ReadCloser: req.Body, left: req.ContentLength, l: t.l}
	}
	return t.RoundTripper.RoundTrip(req)
}

type lateBody struct {
	io.ReadCloser
	left int64
	l    *LateBodyRead
}

func (b *lateBody) Read(p []byte) (int, error) {
	if b.left > 0 {
		n, err := b.ReadCloser.Read(p[:min(int64(len(p)), b.left)])
		b.left -= int64(n)
		return n, err
	}
	select {
	case <-b.l.release:
		b.l.held.Store(true)
	case <-time.After(5 * time.Second):
	}
	defer b.l.once.Do(func() { close(b.l.tail) })
	return b.ReadCloser.Read(p)
}
