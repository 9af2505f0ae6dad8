package chaos

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/testbed"
	"github.com/detourhq/detour/internal/wire"
)

// commandRequest is the HTTP request of one wire-protocol command, as a redirect-capable
// Mercurial client sends it.
func commandRequest(t *testing.T, host string, args map[string]any) []byte {
	t.Helper()
	var body bytes.Buffer
	rw := wire.NewRequestWriter(&body)
	if err := rw.WriteSettings(wire.EncodingIdentity); err != nil {
		t.Fatal(err)
	}
	if err := rw.WriteCommand(&wire.CommandRequest{RequestID: 1, Name: command, Args: args,
		Redirect: &wire.RedirectRequest{Targets: []string{target}, Hashes: []string{"sha256", "sha1"}}}); err != nil {
		t.Fatal(err)
	}
	head := fmt.Sprintf("POST /api/%s/ro/%s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\nAccept: %s\r\nContent-Length: %d\r\n\r\n",
		wire.APIVersion, command, host, wire.MediaTypeFraming, wire.MediaTypeFraming, body.Len())
	return append([]byte(head), body.Bytes()...)
}

// halfClosed is what a client that sent its request and half-closed its connection received.
type halfClosed int

const (
	answered   halfClosed = iota // a whole wire-protocol answer
	closedOnly                   // no answer, the connection closed (or reset)
	empty200                     // 200 OK with an empty body: a client takes it for an empty result
	otherReply                   // anything else (an error status, a truncated body)
)

// A thousand clients send a command for a key nobody has asked for and hang up at once, half of
// them closing the connection, half only their sending side (and reading what comes), while
// honest clients ask for keys of their own: every honest request is answered with the origin's
// bytes, no Place is answered claim_failed, and every key an honest client asked for is filled
// (redirected afterwards). A client's own cancellation is not a control-plane failure.
//
// The agent's claim budget (--claim-rate, 100 per second per agent by default) is shared by all
// its clients, and a thousand disconnects in a few seconds would spend it whatever they cost
// otherwise; this scenario raises it, so that what it measures is the cancellations.
func TestDisconnectingClientsDoNotFailHonestFills(t *testing.T) {
	r := newRig(t, rigOptions{cpFlags: []string{"--claim-rate", "5000", "--claim-burst", "5000"}})
	const disconnects = 1000
	ks := r.newKeyspace("honest", 16, pick(300, 2000), 16<<10)
	r.warm(ks)
	u, err := url.Parse(r.agent.URL)
	r.must(err)
	cpMetrics := "http://" + r.cps[0].MetricsAddr + "/metrics"
	claimFailed0 := testbed.Metric(t, cpMetrics, "detour_place_decisions_total", `reason="claim_failed"`)

	// Honest clients: every other request a fresh key, so each one is a miss that must fill.
	l := r.startLoad(ks, loadOptions{clients: 4, freshEvery: 2, pause: 5 * time.Millisecond})
	var kinds [4]atomic.Int64
	var wg sync.WaitGroup
	work := make(chan int)
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				args := map[string]any{"nodes": []any{fmt.Sprintf("gone-%08d", i)}, "tree": "", "size": uint64(16 << 10)}
				req := commandRequest(t, u.Host, args)
				if i%2 == 0 {
					disconnect(u.Host, req)
				} else {
					kinds[halfClose(u.Host, req)].Add(1)
				}
			}
		}()
	}
	for i := range disconnects {
		work <- i
	}
	close(work)
	wg.Wait()
	time.Sleep(pick(time.Second, 3*time.Second))
	f := l.finish()

	var asked []request
	for i := range min(int(ks.next.Load()), len(ks.fresh)) {
		asked = append(asked, ks.fresh[i])
	}
	// Each honest key was asked once; asked again now (once: asking a miss would fill it), each
	// must be redirected: its first request's fill completed.
	testbed.Eventually(t, 20*time.Second, "the agent's fills finished", func() bool {
		return testbed.Metric(t, r.agent.MetricsURL, "detour_agent_fills_active") == 0
	})
	c, rr := r.client(8)
	unfilled := 0
	for _, q := range asked {
		res, err := c.CommandNoFollow(context.Background(), command, q.args, rr)
		if err != nil || !res.Redirected {
			unfilled++
		}
	}
	claimFailed := testbed.Metric(t, cpMetrics, "detour_place_decisions_total", `reason="claim_failed"`) - claimFailed0
	cancelled := testbed.Metric(t, cpMetrics, "detour_place_decisions_total", `reason="cancelled"`)
	f.extra = fmt.Sprintf("%d clients hung up (%d closed, %d half-closed: %d answered, %d closed, %d empty 200, %d other); %d honest fresh keys, %d not filled; claim_failed %.0f, cancelled %.0f",
		disconnects, disconnects/2, disconnects-disconnects/2, kinds[answered].Load(), kinds[closedOnly].Load(),
		kinds[empty200].Load(), kinds[otherReply].Load(), len(asked), unfilled, claimFailed, cancelled)
	f.report(t, "disconnecting-clients", false)
	if claimFailed > 0 || unfilled > 0 {
		t.Fatalf("%.0f Places were answered claim_failed while clients hung up; %d of %d honest fresh keys were not filled",
			claimFailed, unfilled, len(asked))
	}
	if len(asked) == 0 {
		t.Fatal("the honest clients asked for no fresh key")
	}
}

// disconnect sends req and closes the connection at once, or after up to 5ms.
func disconnect(host string, req []byte) {
	c, err := net.DialTimeout("tcp", host, 5*time.Second)
	if err != nil {
		return
	}
	_, _ = c.Write(req)
	if d := rand.IntN(6); d > 0 {
		time.Sleep(time.Duration(d) * time.Millisecond)
	}
	c.Close()
}

// halfClose sends req, closes its sending side and reads what the agent answers.
func halfClose(host string, req []byte) halfClosed {
	c, err := net.DialTimeout("tcp", host, 5*time.Second)
	if err != nil {
		return closedOnly
	}
	defer c.Close()
	if _, err := c.Write(req); err != nil {
		return closedOnly
	}
	_ = c.(*net.TCPConn).CloseWrite()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return closedOnly
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	switch {
	case resp.StatusCode == http.StatusOK && len(body) == 0 && err == nil:
		return empty200
	case err != nil || resp.StatusCode != http.StatusOK:
		return otherReply
	}
	if n := resp.Header.Get("Content-Length"); n != "" {
		if want, _ := strconv.Atoi(n); want != len(body) {
			return otherReply
		}
	}
	rs, err := wire.ReadResponse(bytes.NewReader(body), 1, wire.ReaderOptions{MaxPayload: wire.MaxPayloadLimit})
	if err != nil {
		return otherReply
	}
	if rs.Status().Status == wire.StatusOK {
		if _, err := io.ReadAll(rs); err != nil {
			return otherReply
		}
	}
	return answered
}
