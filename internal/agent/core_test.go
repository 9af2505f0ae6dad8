package agent_test

// Tests of the core through a front of the tests' own: plain HTTP, where a response is redirected
// with a 302 to its location. It knows nothing of Mercurial, which is the point: everything below
// is the core's behaviour, on a real control plane, etcd and GCS emulator.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/testbed"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// plainFront answers GET /blob/<name>: a redirect (302) to the location, the origin inline, or the
// origin inline while filling.
type plainFront struct{ a *agent.Agent }

func keyOf(path string) string {
	sum := sha256.Sum256([]byte("plain-test-front\x00" + path))
	return hex.EncodeToString(sum[:])
}

func (f *plainFront) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || !strings.HasPrefix(r.URL.Path, "/blob/") {
			next.ServeHTTP(w, r)
			return
		}
		d := f.a.Decide(r, agent.Query{Key: keyOf(r.URL.RequestURI()), Command: "blob", MediaType: storedAs})
		switch d.Outcome {
		case agent.Redirect:
			f.a.Count(d.Label())
			http.Redirect(w, r, d.Location.URL, http.StatusFound)
		case agent.Fill:
			f.a.Count(d.Label())
			defer d.Fill.Finish()
			resp, err := f.a.OriginClient().Get(f.a.OriginURL(r))
			if err != nil {
				d.Fill.Fail(err)
				http.Error(w, "origin unreachable", http.StatusBadGateway)
				return
			}
			defer resp.Body.Close()
			w.WriteHeader(resp.StatusCode)
			buf := make([]byte, 32<<10)
			for {
				n, err := resp.Body.Read(buf)
				if n > 0 {
					_, _ = w.Write(buf[:n])
					d.Fill.Offer(buf[:n])
				}
				if err == io.EOF {
					return
				}
				if err != nil {
					d.Fill.Fail(err)
					return
				}
			}
		default:
			f.a.Relay(w, r, d.Label())
		}
	})
}

// blobOrigin serves /blob/<name>?size=N: N bytes that depend on the name. hold, if set, is
// received from before each answer.
type blobOrigin struct {
	*httptest.Server
	hold   chan struct{}
	served atomic.Int64
}

func content(name string, size int) []byte {
	r := rand.New(rand.NewPCG(uint64(len(name)), uint64(sha256.Sum256([]byte(name))[0])))
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func newBlobOrigin(t *testing.T) *blobOrigin {
	o := &blobOrigin{}
	o.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("cmd") == "capabilities" {
			w.Header().Set("Content-Type", "application/mercurial-0.1")
			return
		}
		if o.hold != nil {
			<-o.hold
		}
		size, _ := strconv.Atoi(r.URL.Query().Get("size"))
		o.served.Add(1)
		_, _ = w.Write(content(r.URL.Path, size))
	}))
	t.Cleanup(o.Close)
	return o
}

type stack struct {
	*devstack.Stack
	origin *blobOrigin
	url    string
	client *http.Client // follows no redirects
}

func startCore(t *testing.T, adjust func(*agent.Config)) *stack {
	t.Helper()
	origin := newBlobOrigin(t)
	s, err := devstack.Start(context.Background(), devstack.Options{DataDir: t.TempDir(), OriginURL: origin.URL + "/",
		PlaceTimeout: 2 * time.Second, Log: quiet, AgentConfig: adjust,
		Fronts: func(a *agent.Agent) ([]agent.Front, error) { return []agent.Front{&plainFront{a}}, nil }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Close(ctx)
	})
	return &stack{Stack: s, origin: origin, url: strings.TrimSuffix(s.AgentURL, "/"),
		client: &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
}

// get asks the agent for path and returns the answer's status, its Location and its body.
func (s *stack) get(t *testing.T, path string) (int, string, []byte) {
	t.Helper()
	resp, err := s.client.Get(s.url + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header.Get("Location"), body
}

// count sums the agent's series of metric (counters and gauges) whose label has value (label "":
// every series).
func (s *stack) count(t *testing.T, metric, label, value string) float64 {
	t.Helper()
	return testbed.MetricSum(t, s.Agent.Metrics().Registry, metric, testbed.Label(label, value))
}

// The core alone, with a protocol it has never heard of: the first request is inline and fills,
// the next is a redirect to identical bytes, and the location is reused from the cache.
func TestCoreServesAFrontItKnowsNothingAbout(t *testing.T) {
	s := startCore(t, nil)
	const path = "/blob/a?size=300000"
	code, _, first := s.get(t, path)
	if code != http.StatusOK || !bytes.Equal(first, content("/blob/a", 300000)) {
		t.Fatalf("first answer: HTTP %d, %d bytes", code, len(first))
	}
	var loc string
	testbed.Eventually(t, 5*time.Second, "a redirect once the fill is reported", func() bool {
		code, loc, _ = s.get(t, path)
		return code == http.StatusFound
	})
	resp, err := http.Get(loc)
	if err != nil {
		t.Fatal(err)
	}
	stored, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !bytes.Equal(stored, first) {
		t.Fatalf("the location serves %d bytes that differ from the inline answer", len(stored))
	}
	before := s.origin.served.Load()
	for range 5 {
		if code, again, _ := s.get(t, path); code != http.StatusFound || again != loc {
			t.Fatalf("cached redirect: HTTP %d to %s", code, again)
		}
	}
	if n := s.origin.served.Load() - before; n != 0 {
		t.Fatalf("the origin served %d redirected requests", n)
	}
}

// slowStore holds every upload write until released: a store that has fallen behind.
type slowStore struct {
	agent.Store
	release chan struct{}
}

type slowUpload struct {
	agent.Upload
	release chan struct{}
}

func (s slowStore) Create(ctx context.Context, bucket, name, mediaType, key string) agent.Upload {
	return slowUpload{s.Store.Create(ctx, bucket, name, mediaType, key), s.release}
}

func (u slowUpload) Write(p []byte) (int, error) {
	<-u.release
	return u.Upload.Write(p)
}

// A fill whose store falls more than FillQueueBytes behind the client is aborted: the client gets
// its whole answer at the origin's pace, and nothing is stored.
func TestFillFallingBehindTheStoreIsAbortedNotWaitedFor(t *testing.T) {
	release := make(chan struct{})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	t.Cleanup(unblock)
	s := startCore(t, func(c *agent.Config) {
		c.Store = slowStore{Store: c.Store, release: release}
		c.FillQueueBytes = 256 << 10
	})
	const path = "/blob/slow?size=2000000"
	start := time.Now()
	code, _, body := s.get(t, path)
	if code != http.StatusOK || !bytes.Equal(body, content("/blob/slow", 2000000)) {
		t.Fatalf("answer: HTTP %d, %d bytes", code, len(body))
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("the client waited %v on a store that does not take bytes", took)
	}
	unblock()
	testbed.Eventually(t, 10*time.Second, "the fill counted aborted", func() bool {
		return s.count(t, "detour_agent_fills_total", "outcome", "aborted") == 1
	})
	if n := s.count(t, "detour_agent_fills_total", "outcome", "ready"); n != 0 {
		t.Fatalf("%v fills ready from a fill that fell behind", n)
	}
	// An aborted upload leaves nothing behind (the store may commit a cut body late; the
	// upload's Abort deletes its own bytes then).
	testbed.Eventually(t, 5*time.Second, "no object left by the aborted fill", func() bool { return objectCount(t, s) == 0 })
	// The claim was released at once, not left to its TTL.
	testbed.Eventually(t, 5*time.Second, "the claim released", func() bool {
		return cpCount(t, s, "detour_fill_reports_total", "outcome", "aborted") == 1
	})
}

// cpCount sums the control plane's series of metric whose label has value.
func cpCount(t *testing.T, s *stack, metric, label, value string) float64 {
	t.Helper()
	return testbed.MetricSum(t, s.CP.Metrics().Registry, metric, testbed.Label(label, value))
}

func objectCount(t *testing.T, s *stack) int {
	t.Helper()
	names, err := s.GCS.ObjectNames("detour-demo")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, name := range names {
		if strings.HasPrefix(name, "objects/") && !strings.Contains(name, "canary") {
			n++
		}
	}
	return n
}

// Past MaxConcurrentRequests a request is answered 503 with Retry-After at once, and the agent
// serves again as soon as requests finish.
func TestRequestsPastTheLimitGet503(t *testing.T) {
	s := startCore(t, func(c *agent.Config) { c.MaxConcurrentRequests = 2 })
	s.origin.hold = make(chan struct{})
	var wg sync.WaitGroup
	codes := make([]int, 2)
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Relayed to the origin, held there.
			if resp, err := s.client.Get(fmt.Sprintf("%s/other/%d", s.url, i)); err == nil {
				codes[i] = resp.StatusCode
				resp.Body.Close()
			}
		}()
	}
	testbed.Eventually(t, 5*time.Second, "two requests in flight", func() bool {
		return s.count(t, "detour_agent_requests_in_flight", "", "") == 2
	})
	resp, err := s.client.Get(s.url + "/other/3")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("third request: HTTP %d, Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	if n := s.count(t, "detour_agent_requests_total", "outcome", "overloaded"); n != 1 {
		t.Fatalf("overloaded answers counted: %v", n)
	}
	close(s.origin.hold)
	wg.Wait()
	if codes[0] != http.StatusOK || codes[1] != http.StatusOK {
		t.Fatalf("the requests in flight were answered HTTP %v", codes)
	}
	if code, _, _ := s.get(t, "/other/4"); code != http.StatusOK {
		t.Fatalf("after the load: HTTP %d", code)
	}
}

// storedAs is the media type this front asks its fills to be stored as.
const storedAs = "application/octet-stream"

// An object an earlier fill stored without reporting it is adopted when it holds exactly the
// fill's bytes, and refused when it does not.
func TestFillAdoptsAnIdenticalObjectAlreadyStored(t *testing.T) {
	s := startCore(t, nil)
	ctx := context.Background()
	store := func(path string, data []byte) {
		key := keyOf(path)
		up := s.Store.Create(ctx, "detour-demo", blob.ObjectName("objects/", key), storedAs, key)
		if _, err := up.Write(data); err != nil {
			t.Fatal(err)
		}
		if _, err := up.Commit(); err != nil {
			t.Fatal(err)
		}
	}
	same, other := "/blob/same?size=100000", "/blob/other?size=100000"
	store(same, content("/blob/same", 100000))
	store(other, content("/blob/not-other", 100000))
	s.get(t, same)
	s.get(t, other)
	testbed.Eventually(t, 10*time.Second, "both fills ended", func() bool {
		return s.count(t, "detour_agent_fills_total", "outcome", "ready")+s.count(t, "detour_agent_fills_total", "outcome", "upload_failed") == 2
	})
	if code, _, _ := s.get(t, same); code != http.StatusFound {
		t.Fatalf("the identical object was not adopted: HTTP %d", code)
	}
	if code, _, body := s.get(t, other); code != http.StatusOK || !bytes.Equal(body, content("/blob/other", 100000)) {
		t.Fatalf("an object with other bytes was adopted: HTTP %d", code)
	}
}

// With CheckLocations 1 every redirect's location is checked in the background: a location whose
// object has gone is reported, the control plane confirms it and drops the record, and the next
// request is answered inline.
func TestBrokenLocationsAreReportedAndDropped(t *testing.T) {
	s := startCore(t, func(c *agent.Config) { c.CheckLocations = 1; c.LocationCacheEntries = -1 })
	const path = "/blob/checked?size=100000"
	s.get(t, path)
	testbed.Eventually(t, 5*time.Second, "a redirect", func() bool {
		code, _, _ := s.get(t, path)
		return code == http.StatusFound
	})
	testbed.Eventually(t, 5*time.Second, "a location checked ok", func() bool {
		return s.count(t, "detour_agent_location_checks_total", "result", "ok") >= 1
	})
	if err := s.Store.Delete(context.Background(), "detour-demo", blob.ObjectName("objects/", keyOf(path)), 0); err != nil {
		t.Fatal(err)
	}
	testbed.Eventually(t, 10*time.Second, "the deleted object answered inline", func() bool {
		code, _, _ := s.get(t, path)
		return code == http.StatusOK
	})
	if n := s.count(t, "detour_agent_location_checks_total", "result", "broken"); n < 1 {
		t.Fatalf("broken locations counted: %v", n)
	}
}
