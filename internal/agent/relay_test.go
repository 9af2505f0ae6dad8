package agent_test

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/testbed"
)

// A relayed request with a body (a push, say) gets the origin's whole answer even when the
// transport's last read of the body comes after the answer has started: the server must not have
// drained and closed the body under it, which made that read fail and cut the origin connection,
// and with it the client's answer, mid-stream (golang.org/issue/40747). The agent is safe because
// the http.MaxBytesReader it wraps every body in remembers the end of the body; without it this
// test fails, and the relay would need http.ResponseController.EnableFullDuplex.
func TestRelayedAnswerIsNotCutByALateReadOfTheRequestBody(t *testing.T) {
	late := testbed.NewLateBodyRead(t)
	u, err := url.Parse(late.Upstream.URL)
	if err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(context.Background(), agent.Config{Origin: u, Log: quiet, Transport: late.Transport})
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
	req, err := http.NewRequest(http.MethodPost, "http://"+lis.Addr().String()+"/?cmd=unbundle", bytes.NewReader(bytes.Repeat([]byte("x"), 10<<10)))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/mercurial-0.1")
	late.Check(t, req)
}
