package chaos

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/testbed"
	"github.com/detourhq/detour/internal/wire"
)

// Clients that send their headers or their command body a byte at a time are closed by the agent
// once its read timeouts pass, while other clients are served as usual; the agent's open file
// descriptors return to where they were and its memory stays bounded.
func TestSlowClientsAreClosedByTheReadTimeouts(t *testing.T) {
	const headerTimeout, bodyTimeout = time.Second, time.Second
	const slack = 2 * time.Second // dialing and scheduling on a loaded machine
	r := newRig(t, rigOptions{agentFlags: []string{"--read-header-timeout", headerTimeout.String(),
		"--command-body-timeout", bodyTimeout.String()}})
	ks := r.newKeyspace("slow", 64, 0, 32<<10)
	r.warm(ks)
	pid := r.agent.PID()
	l := r.startLoad(ks, loadOptions{clients: 8, pause: time.Millisecond})
	time.Sleep(time.Second)
	fd0, rss0 := openFDs(t, pid), rssBytes(t, pid)

	n := pick(100, 500)
	u, err := url.Parse(r.agent.URL)
	r.must(err)
	type closed struct {
		kind string
		took time.Duration
		err  error
	}
	results := make(chan closed, 2*n)
	var wg sync.WaitGroup
	for i := range 2 * n {
		slowBody := i%2 == 1
		wg.Add(1)
		go func() {
			defer wg.Done()
			kind, took, err := "header", time.Duration(0), error(nil)
			if slowBody {
				kind = "body"
				took, err = trickle(u.Host, "POST /api/"+wire.APIVersion+"/ro/manifestdata HTTP/1.1\r\nHost: chaos\r\nContent-Type: "+
					wire.MediaTypeFraming+"\r\nAccept: "+wire.MediaTypeFraming+"\r\nContent-Length: 100000\r\n\r\n", bodyTimeout+slack+5*time.Second)
			} else {
				took, err = trickle(u.Host, "GET /?cmd=capabilities HTTP/1.1\r\nHost: chaos\r\nX-Slow: ", headerTimeout+slack+5*time.Second)
			}
			results <- closed{kind, took, err}
		}()
	}
	// Sample the agent while the slow clients hold their connections.
	peakFD, peakRSS := fd0, rss0
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for range 40 {
			peakFD, peakRSS = max(peakFD, openFDs(t, pid)), max(peakRSS, rssBytes(t, pid))
			time.Sleep(50 * time.Millisecond)
		}
	}()
	wg.Wait()
	<-sampled
	close(results)
	worst := map[string]time.Duration{}
	for c := range results {
		if c.err != nil {
			t.Errorf("slow %s client: %v", c.kind, c.err)
		}
		worst[c.kind] = max(worst[c.kind], c.took)
	}
	var fdAfter int
	testbed.Eventually(t, 10*time.Second, "the agent's descriptors back to where they were", func() bool {
		fdAfter = openFDs(t, pid)
		return fdAfter <= fd0+16
	})
	time.Sleep(500 * time.Millisecond)
	f := l.finish()
	f.extra = fmt.Sprintf("%d slow-header and %d slow-body clients closed after at most %s and %s; agent fds %d → peak %d → %d, RSS %d → peak %d MiB",
		n, n, worst["header"].Round(time.Millisecond), worst["body"].Round(time.Millisecond), fd0, peakFD, fdAfter, rss0>>20, peakRSS>>20)
	f.report(t, "slow-clients", false)
	if worst["header"] > headerTimeout+slack {
		t.Errorf("a slow-header client was closed after %s (read-header-timeout %s)", worst["header"], headerTimeout)
	}
	if worst["body"] > bodyTimeout+slack {
		t.Errorf("a slow-body client was closed after %s (command-body-timeout %s)", worst["body"], bodyTimeout)
	}
	if peakFD > fd0+2*n+64 {
		t.Errorf("the agent held %d descriptors for %d slow clients (from %d)", peakFD, 2*n, fd0)
	}
	if peakRSS > rss0+128<<20 {
		t.Errorf("the agent's RSS grew from %d to %d MiB for %d slow clients", rss0>>20, peakRSS>>20, 2*n)
	}
}

// trickle connects to addr, sends head, then one byte every 100ms until the server closes the
// connection (or giveUp passes, an error). It returns how long after the head the close came.
func trickle(addr, head string, giveUp time.Duration) (time.Duration, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	start := time.Now()
	if _, err := io.WriteString(c, head); err != nil {
		return 0, err
	}
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if _, err := c.Write([]byte{'a'}); err != nil {
					return
				}
			}
		}
	}()
	defer close(done)
	_ = c.SetReadDeadline(start.Add(giveUp))
	_, err = io.Copy(io.Discard, c) // any answer, then the close
	took := time.Since(start)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return took, fmt.Errorf("still open after %s", giveUp)
	}
	return took, nil // EOF or a reset: closed
}

func openFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func rssBytes(t *testing.T, pid int) int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if rest, ok := strings.CutPrefix(s.Text(), "VmRSS:"); ok {
			kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// A thousand clients at once through one agent: every one answered, with the origin's bytes, and
// served fairly; the agent's descriptors and memory grow with the connections and no further, and
// the descriptors come back when the clients leave.
func TestThousandConcurrentClients(t *testing.T) {
	const clients = 1000
	r := newRig(t, rigOptions{})
	ks := r.newKeyspace("thousand", 128, pick(500, 5000), 16<<10)
	r.warm(ks)
	pid := r.agent.PID()
	fd0, rss0 := openFDs(t, pid), rssBytes(t, pid)
	u, err := url.Parse(r.agent.URL)
	if err != nil {
		t.Fatal(err)
	}
	conns0 := establishedOn(t, u.Port()) // the warm-up's idle connections
	l := r.startLoad(ks, loadOptions{clients: clients, freshEvery: 20})
	peakFD, peakRSS := fd0, rss0
	for end := time.Now().Add(pick(3*time.Second, 15*time.Second)); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
		peakFD, peakRSS = max(peakFD, openFDs(t, pid)), max(peakRSS, rssBytes(t, pid))
	}
	f := l.finish()
	elapsed := l.now() // the last answer
	var agentP99, fetchP99 time.Duration
	served := map[int]bool{}
	{
		var agentLat, fetchLat []time.Duration
		for _, rc := range f.recs {
			agentLat, fetchLat = append(agentLat, rc.end-rc.start-rc.fetch), append(fetchLat, rc.fetch)
			if !rc.failed && !rc.wrong {
				served[rc.client] = true
			}
		}
		agentP99, fetchP99 = quantile(agentLat, 0.99), quantile(fetchLat, 0.99)
	}
	rate := float64(len(f.recs)) / elapsed.Seconds()
	// A closed loop of N clients at X answers/s waits N/X per answer on average (Little's law).
	round := time.Duration(float64(clients) / rate * float64(time.Second))
	f.extra = fmt.Sprintf("%d clients, %.0f answers/s (a round %s): in flight at once %d; p99 of the agent's part %s, of the store fetch %s; agent fds %d → peak %d, RSS %d → peak %d MiB",
		clients, rate, round.Round(time.Millisecond), maxInFlight(f.recs), agentP99.Round(time.Millisecond), fetchP99.Round(time.Millisecond),
		fd0, peakFD, rss0>>20, peakRSS>>20)
	f.report(t, "1000-clients", false)

	// The load was what it says: the clients were in flight together.
	if n := maxInFlight(f.recs); n < clients*9/10 {
		t.Fatalf("at most %d requests were in flight at once, not the %d clients", n, clients)
	}
	// Fair service: every client was answered, and the slowest answers are not starved (a FIFO
	// queue of N clients keeps the agent's p99 within a few rounds).
	if len(served) != clients {
		t.Fatalf("%d of %d clients got a correct answer in %s", len(served), clients, elapsed.Round(time.Millisecond))
	}
	if limit := 4*round + time.Second; agentP99 > limit {
		t.Fatalf("p99 of the agent's part %s, over 4 rounds (%s) and a second: some clients wait far longer than others", agentP99, round)
	}
	// A connection per client and a bounded number to the origin, the store and the control
	// plane; about 100 KiB of memory per connection at most.
	if peakFD > fd0+clients+256 {
		t.Fatalf("agent descriptors peaked at %d, from %d with %d clients: more than a connection each", peakFD, fd0, clients)
	}
	if grew := peakRSS - rss0; grew > clients*100<<10 {
		t.Fatalf("agent RSS grew by %d MiB with %d clients: over 100 KiB per connection", grew>>20, clients)
	}
	// The clients leave; the agent closes their connections (what stays open is its pools of idle
	// connections to the origin and the store, bounded above).
	l.c.HTTP.Transport.(*http.Transport).CloseIdleConnections()
	testbed.Eventually(t, 10*time.Second, "the clients' connections closed by the agent", func() bool {
		return establishedOn(t, u.Port()) <= conns0
	})
}

// establishedOn counts the established TCP connections whose local port is port on this host
// (the tests' and the binaries' sockets share the network namespace).
func establishedOn(t *testing.T, port string) int {
	t.Helper()
	p, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	local := fmt.Sprintf(":%04X", p)
	n := 0
	for _, file := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) > 3 && strings.HasSuffix(f[1], local) && f[3] == "01" {
				n++
			}
		}
	}
	return n
}

// maxInFlight is the largest number of requests in flight at one time.
func maxInFlight(recs []record) int {
	type edge struct {
		at    time.Duration
		delta int
	}
	edges := make([]edge, 0, 2*len(recs))
	for _, r := range recs {
		edges = append(edges, edge{r.start, 1}, edge{r.end, -1})
	}
	slices.SortFunc(edges, func(a, b edge) int {
		if a.at != b.at {
			return int(a.at - b.at)
		}
		return a.delta - b.delta // an end before a start at the same instant
	})
	n, peak := 0, 0
	for _, e := range edges {
		n += e.delta
		peak = max(peak, n)
	}
	return peak
}
