package hgv2_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/front/hgv2"
	"github.com/detourhq/detour/internal/hgclient"
	"github.com/detourhq/detour/internal/testbed"
	"github.com/detourhq/detour/internal/wire"
)

func startStackCfg(t *testing.T, adjust func(*agent.Config)) (*devstack.Stack, *hgclient.Client) {
	return startStackOpts(t, devstack.Options{AgentConfig: adjust})
}

// startStackOpts starts a stack with o's adjustments (and the defaults of these tests).
func startStackOpts(t *testing.T, o devstack.Options) (*devstack.Stack, *hgclient.Client) {
	t.Helper()
	o.DataDir, o.ObjectSize, o.PlaceTimeout, o.Log, o.AgentMetrics = t.TempDir(), 200<<10, placeTimeout, quiet, "127.0.0.1:0"
	s, err := devstack.Start(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Close(ctx)
	})
	return s, &hgclient.Client{Base: s.AgentURL}
}

// cpCount sums a control-plane counter's series whose labels include every one of labels.
func cpCount(t *testing.T, s *devstack.Stack, metric string, labels map[string]string) float64 {
	t.Helper()
	return testbed.MetricSum(t, s.CP.Metrics().Registry, metric, labels)
}

// Clients that send a command's headers and then trickle its body are cut off after the command
// body timeout instead of holding a connection (and a file descriptor) forever.
func TestSlowCommandBodiesAreCutOff(t *testing.T) {
	s, _ := startStackOpts(t, devstack.Options{V2Config: func(c *hgv2.Config) { c.CommandBodyTimeout = 300 * time.Millisecond }})
	u, _ := url.Parse(s.AgentURL)
	const clients = 50
	var wg sync.WaitGroup
	closedAfter := make([]time.Duration, clients)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := net.Dial("tcp", u.Host)
			if err != nil {
				t.Error(err)
				return
			}
			defer conn.Close()
			start := time.Now()
			fmt.Fprintf(conn, "POST /api/%s/ro/manifestdata HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: 100000\r\n\r\n",
				wire.APIVersion, wire.MediaTypeFraming)
			// One byte every 50ms, until the agent answers or closes.
			go func() {
				for range 200 {
					if _, err := conn.Write([]byte{0}); err != nil {
						return
					}
					time.Sleep(50 * time.Millisecond)
				}
			}()
			_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, _ = io.Copy(io.Discard, conn)
			closedAfter[i] = time.Since(start)
		}()
	}
	wg.Wait()
	for i, d := range closedAfter {
		if d > 3*time.Second {
			t.Fatalf("slow client %d held its connection for %s; the command body timeout is 300ms", i, d)
		}
	}
}

// With the store failing, the first fill's failure opens the target's breaker: later misses are
// answered inline without a claim (the agent tells Place it cannot fill there), instead of every
// miss writing a claim to etcd and starting an upload that fails.
func TestStoreFailuresStopClaimsInsteadOfStorming(t *testing.T) {
	s, c := startStackCfg(t, nil)
	ctx := context.Background()
	rr := redirectReq(t, c)
	s.GCS.Stop()
	start := time.Now()
	misses := 0
	for time.Since(start) < 1500*time.Millisecond {
		res, err := c.Command(ctx, "manifestdata", args(fmt.Sprintf("storm%03d", misses), 20000), rr)
		if err != nil || res.Redirected || len(res.Objects) < 20000 {
			t.Fatalf("miss %d with the store down: %v", misses, err)
		}
		misses++
	}
	grants := outcomes(t, s, "inline_fill")
	if misses < 10 {
		t.Fatalf("only %d misses in 1.5s; the test needs more to mean anything", misses)
	}
	// One failed fill, then one trial per backoff (1s, then 2s…).
	if grants > 3 {
		t.Fatalf("%v of %d misses started a fill against a failing store", grants, misses)
	}
	t.Logf("%d misses with the store down: %v fills tried", misses, grants)
	// The control plane counts every grant it wrote; the agent acts on those that reach it in time
	// and that its breaker and budget still admit. On a loaded machine a grant can arrive after the
	// place deadline (its claim is released as an orphan), or while the first failing upload has
	// not yet opened the breaker (the agent declines it): allow those, not a grant per miss.
	late := agentCount(t, s, "detour_agent_place_failures_total", "cause", codes.DeadlineExceeded.String())
	declined := agentCount(t, s, "detour_agent_fills_total", "outcome", "declined")
	if got := cpCount(t, s, "detour_place_decisions_total", map[string]string{"reason": "fill"}); got > grants+late+declined || got > 3+late+declined {
		t.Fatalf("the control plane granted %v fills (claims written) against a failing store; the agent started %v, declined %v, and %v Place answers were late",
			got, grants, declined, late)
	}
}

// An agent that cannot fill (no store here) says so in Place, so the control plane writes no claim
// that the agent would only abort.
func TestAgentThatCannotFillTakesNoClaims(t *testing.T) {
	s, c := startStackCfg(t, func(c *agent.Config) { c.NoFills = true })
	ctx := context.Background()
	rr := redirectReq(t, c)
	for i := range 5 {
		if _, err := c.Command(ctx, "manifestdata", args(fmt.Sprint("nofill", i), 20000), rr); err != nil {
			t.Fatal(err)
		}
	}
	if got := cpCount(t, s, "detour_place_decisions_total", map[string]string{"reason": "agent_cannot_fill"}); got != 5 {
		t.Fatalf("%v of 5 misses answered agent_cannot_fill", got)
	}
	if got := cpCount(t, s, "detour_fill_reports_total", map[string]string{"outcome": "aborted"}); got != 0 {
		t.Fatalf("%v claims written and aborted for an agent that cannot fill", got)
	}
}

// When all fills together hold the byte budget, new misses are not granted fills: memory has a
// global bound, and no claim is written for a fill that could not run.
func TestFillBudgetDeclinesNewFills(t *testing.T) {
	s, c := startStackCfg(t, func(c *agent.Config) { c.MaxFills, c.PlaceTimeout = 1, 5*time.Second })
	ctx := context.Background()
	rr := redirectReq(t, c)
	// Hold the one fill slot: a slow client keeps a fill open while it reads slowly.
	body := &strings.Builder{}
	wr := wire.NewRequestWriter(&stringWriter{body})
	if err := wr.WriteCommand(&wire.CommandRequest{RequestID: 1, Name: "filesdata", Args: args("budget0", 200<<20), Redirect: rr}); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.AgentURL+"api/"+wire.APIVersion+"/ro/filesdata", strings.NewReader(body.String()))
	req.Header.Set("Content-Type", wire.MediaTypeFraming)
	req.Header.Set("Accept", wire.MediaTypeFraming)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if _, err := br.Peek(1); err != nil {
		t.Fatal(err)
	}
	if n := outcomes(t, s, "inline_fill"); n != 1 {
		t.Fatalf("the slow request is not filling (%v fills)", n)
	}
	for i := range 3 {
		if _, err := c.Command(ctx, "manifestdata", args(fmt.Sprint("budget", i+1), 20000), rr); err != nil {
			t.Fatal(err)
		}
	}
	if n := outcomes(t, s, "inline_fill"); n != 1 {
		t.Fatalf("%v fills with a budget of one fill", n)
	}
	if got := cpCount(t, s, "detour_place_decisions_total", map[string]string{"reason": "agent_cannot_fill"}); got != 3 {
		t.Fatalf("%v of 3 misses declined before a claim", got)
	}
}

type stringWriter struct{ b *strings.Builder }

func (w *stringWriter) Write(p []byte) (int, error) { return w.b.Write(p) }

// A request whose body cannot be relayed gets an answer that says so, not "origin unreachable":
// a Content-Length over the limit is refused before anything is sent to the origin.
func TestOversizeBodiesAreRefusedWithAClearError(t *testing.T) {
	s, _ := startStackCfg(t, func(c *agent.Config) { c.MaxBodyBytes = 1 << 20 })
	u, _ := url.Parse(s.AgentURL)
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "POST /?cmd=unbundle HTTP/1.1\r\nHost: x\r\nContent-Type: application/mercurial-0.1\r\nContent-Length: 1099511627776\r\n\r\nabc")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(b), "exceeds the limit") {
		t.Fatalf("got HTTP %d %q, want 413 naming the limit", resp.StatusCode, b)
	}
}

// /healthz answers while the process runs; /readyz only once the control plane has answered and
// the target set is known; /metrics carries Go runtime and process metrics.
func TestOpsEndpoints(t *testing.T) {
	s, _ := startStackCfg(t, nil)
	ops := "http://" + s.AgentMetricsAddr()
	get := func(path string) (int, string) {
		resp, err := http.Get(ops + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Fatalf("/healthz: %d", code)
	}
	if code, body := get("/readyz"); code != 200 {
		t.Fatalf("/readyz with the target set known: %d %s", code, body)
	}
	_, metrics := get("/metrics")
	for _, m := range []string{"go_goroutines", "process_resident_memory_bytes", "detour_agent_controlplane_up 1"} {
		if !strings.Contains(metrics, m) {
			t.Errorf("/metrics lacks %s", m)
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	s.CP.Shutdown(sctx)
	cancel()
	// The next Place fails; the agent is then not ready until a probe succeeds.
	c := &hgclient.Client{Base: s.AgentURL}
	_, _ = c.Command(context.Background(), "manifestdata", args("ready", 1000), &wire.RedirectRequest{Targets: []string{"local-gcs"}})
	if code, body := get("/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "control plane") {
		t.Fatalf("/readyz with the control plane down: %d %s", code, body)
	}
	if _, metrics := get("/metrics"); !strings.Contains(metrics, "detour_agent_controlplane_up 0") {
		t.Fatal("the control plane's absence is not in the metrics")
	}
}

// An origin whose answer breaks off midway: the agent cuts the client's connection rather than
// end the answer as if it were complete, which an HTTP client would take it for.
func TestAnAnswerTheOriginBreaksOffIsCutNotEnded(t *testing.T) {
	var origin atomic.Pointer[url.URL]
	proxy := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) { pr.SetURL(origin.Load()) },
		ModifyResponse: func(resp *http.Response) error {
			if strings.HasSuffix(resp.Request.URL.Path, "/manifestdata") {
				resp.Body = &breaksOff{ReadCloser: resp.Body, left: 4096}
			}
			return nil
		},
		ErrorLog: log.New(io.Discard, "", 0),
	}
	breaking := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if origin.Load() == nil {
			http.Error(w, "not yet", http.StatusServiceUnavailable)
			return
		}
		proxy.ServeHTTP(w, r)
	}))
	defer breaking.Close()
	s, c := startStackCfg(t, func(cfg *agent.Config) {
		u, err := url.Parse(breaking.URL + "/")
		if err != nil {
			t.Fatal(err)
		}
		cfg.Origin = u
	})
	u, err := url.Parse(s.OriginURL)
	if err != nil {
		t.Fatal(err)
	}
	origin.Store(u)

	req, err := c.CommandRequest(context.Background(), "manifestdata", args("c", 64<<10), redirectReq(t, c))
	if err != nil {
		t.Fatal(err)
	}
	// The client must not be handed a complete HTTP answer: the request fails (nothing was sent
	// before the cut) or its body does (part of it was).
	if resp, err := http.DefaultClient.Do(req); err == nil {
		got, rerr := io.ReadAll(resp.Body)
		resp.Body.Close()
		if rerr == nil {
			t.Fatalf("HTTP %d: a complete answer of %d bytes (%q) for one the origin broke off", resp.StatusCode, len(got), got)
		}
	}
	// The fill of the broken answer failed (before the cut: nothing partial is stored or placed).
	eventually(t, 10*time.Second, "the broken answer's fill aborted", func() bool {
		return agentCount(t, s, "detour_agent_fills_total", "outcome", "aborted") == 1
	})
	if n := agentCount(t, s, "detour_agent_fills_total", "outcome", "ready"); n != 0 {
		t.Fatalf("%v fills of a broken answer made ready", n)
	}
	// The agent goes on serving: a whole answer through the same origin.
	if _, err := c.Command(context.Background(), "heads", nil, nil); err != nil {
		t.Fatalf("after a broken answer: %v", err)
	}
}

// breaksOff passes left bytes of a body, then fails as a connection that dropped would.
type breaksOff struct {
	io.ReadCloser
	left int
}

func (b *breaksOff) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return 0, io.ErrUnexpectedEOF
	}
	if len(p) > b.left {
		p = p[:b.left]
	}
	n, err := b.ReadCloser.Read(p)
	b.left -= n
	return n, err
}
