// Package chaos breaks a running Detour deployment while clients use it, and checks what every
// client got. The control planes and the agent are the real binaries in real processes (testbed);
// etcd members, the GCS emulator with its fault-injecting fronts, and the origin run in the test
// process on loopback. A load driver sends concurrent wire-protocol-v2 requests through the agent,
// follows redirects, and compares every answer's bytes with the origin's.
//
// Two forms: the short one (the default, and always under -short) fits `make test`; the long one
// (DETOUR_CHAOS=full, `make chaos`) runs each fault for longer with more clients. Each scenario
// prints one line of figures.
package chaos

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/demoorigin"
	"github.com/detourhq/detour/internal/etcdembed"
	"github.com/detourhq/detour/internal/gcsemu"
	"github.com/detourhq/detour/internal/hgclient"
	"github.com/detourhq/detour/internal/testbed"
	"github.com/detourhq/detour/internal/wire"
)

const (
	bucket  = "detour-chaos"
	target  = "chaos-gcs"
	repoID  = "chaos-repo"
	command = "manifestdata"
)

// full reports whether this is the long form (`make chaos`).
func full() bool { return os.Getenv("DETOUR_CHAOS") == "full" && !testing.Short() }

// pick returns short in the short form and long in the long one.
func pick[T any](short, long T) T {
	if full() {
		return long
	}
	return short
}

// rig is one deployment: origin, GCS emulator behind two fronts (the targets' client-facing URL,
// which the control planes probe, and the API the agent uploads through and the control planes
// verify through), etcd members, control-plane processes and one agent process.
type rig struct {
	t         *testing.T
	origin    *demoorigin.Origin
	originURL string
	gcs       *gcsemu.Server
	front     *gcsemu.Front // client-facing URL of the target
	api       *gcsemu.Front // the store's API
	etcd      []*etcdembed.Server
	cps       []*testbed.ControlPlane
	agent     *testbed.Agent
	admin     pb.AdminServiceClient
	// agentFlags are every agent's flags; startAgent adds its own.
	agentFlags []string
}

type rigOptions struct {
	etcdMembers   int // default 1
	controlPlanes int // default 1
	cpFlags       []string
	agentFlags    []string
	etcdQuota     int64 // each member's space quota (0: etcd's default)
}

func newRig(t *testing.T, o rigOptions) *rig {
	t.Helper()
	if o.etcdMembers == 0 {
		o.etcdMembers = 1
	}
	if o.controlPlanes == 0 {
		o.controlPlanes = 1
	}
	r := &rig{t: t, origin: demoorigin.New(32 << 10)}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	r.must(err)
	srv := &http.Server{Handler: r.origin, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Close() })
	r.originURL = "http://" + lis.Addr().String() + "/"

	r.gcs, err = gcsemu.Start(0)
	r.must(err)
	t.Cleanup(r.gcs.Stop)
	r.front, err = r.gcs.StartFront()
	r.must(err)
	t.Cleanup(r.front.Close)
	r.api, err = r.gcs.StartFront()
	r.must(err)
	t.Cleanup(r.api.Close)
	r.gcs.CreateBucket(bucket)

	// Every control plane follows the bucket's notifications (as `make run` does): the emulator
	// publishes them to the Pub/Sub emulator in this process.
	pubsubAddr, err := gcsemu.PubSub()
	r.must(err)
	events := strings.NewReplacer("/", "-", "_", "-").Replace(t.Name())
	o.cpFlags = append([]string{"--store-events-topic", "projects/chaos/topics/" + events,
		"--store-events-subscription", "projects/chaos/subscriptions/" + events, "--pubsub-endpoint", pubsubAddr}, o.cpFlags...)

	dirs := make([]string, o.etcdMembers)
	for i := range dirs {
		dirs[i] = t.TempDir()
	}
	r.etcd, err = etcdembed.StartClusterQuota(context.Background(), dirs, o.etcdQuota)
	r.must(err)
	var endpoints, addrs []string
	for _, m := range r.etcd {
		t.Cleanup(m.Close)
		endpoints = append(endpoints, m.Endpoint())
	}
	for range o.controlPlanes {
		etcdClient := r.etcd[0].PKI().Client // the members' CA admits only its own certificates
		cp := testbed.StartControlPlane(t, append([]string{"--etcd-endpoints", strings.Join(endpoints, ","),
			"--etcd-cacert", etcdClient.CA, "--etcd-cert", etcdClient.Cert, "--etcd-key", etcdClient.Key,
			"--gcs-endpoint", r.storeEndpoint(), "--log-level", "info"}, o.cpFlags...)...)
		r.cps = append(r.cps, cp)
		addrs = append(addrs, cp.Addr)
	}
	r.admin = pb.NewAdminServiceClient(testbed.Dial(t, r.cps[0].Addr, testbed.PKI(t).Operator))
	public := r.front.PublicURL(bucket)
	_, err = r.admin.CreateTarget(context.Background(), &pb.CreateTargetRequest{Target: &pb.Target{Name: target, Protocol: "http",
		Uris: []string{public}, Region: "test", Weight: 1, Store: &pb.GcsStore{Bucket: bucket, Prefix: "objects/"},
		UrlForm: &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: public}}}})
	r.must(err)
	// Fresh keys are asked for once each, and each must fill: admission on the first miss.
	cur, err := r.admin.GetPolicy(context.Background(), &pb.GetPolicyRequest{})
	r.must(err)
	cur.Policy.MinOccurrences = 1
	_, err = r.admin.SetPolicy(context.Background(), &pb.SetPolicyRequest{Policy: cur.Policy})
	r.must(err)

	// No location cache: every request asks the control plane, which is what these tests break.
	// A place timeout of 1s rather than the default 50ms: Place leaves half of it to the fill
	// claim, an etcd write, and on a loaded small machine (three etcd members fsyncing on one
	// disk) 25ms is often not enough, so keys would rarely fill and the fill path would go
	// untested. The freeze scenario sets the default back, since its bound is about it.
	r.agentFlags = []string{"--controlplane", strings.Join(addrs, ","),
		"--region", "test", "--agent-id", "chaos-agent", "--gcs-endpoint", r.storeEndpoint(), "--repo-id", repoID,
		"--no-origin-auth", "--location-cache-entries", "-1", "--place-timeout", "1s", "--log-level", "info"}
	r.startAgent(o.agentFlags...)
	return r
}

// startAgent starts the rig's agent with extra flags (which override the rig's) and waits until
// it advertises the target.
func (r *rig) startAgent(extra ...string) {
	r.t.Helper()
	r.agent = testbed.StartAgent(r.t, r.originURL, append(slices.Clone(r.agentFlags), extra...)...)
	testbed.Eventually(r.t, 20*time.Second, "the agent advertises the target", func() bool {
		hs, err := (&hgclient.Client{Base: r.agent.URL}).Capabilities(context.Background())
		return err == nil && hs.Redirect != nil && slices.Contains(hgclient.Accepted(hs.Redirect, "http"), target)
	})
}

// replaceAgent stops the agent and starts another with extra flags: what it stored stays.
func (r *rig) replaceAgent(extra ...string) {
	r.t.Helper()
	r.must(r.agent.Stop(10 * time.Second))
	r.startAgent(extra...)
}

func (r *rig) storeEndpoint() string { return r.api.URL + "storage/v1/" }

func (r *rig) must(err error) {
	r.t.Helper()
	if err != nil {
		r.t.Fatal(err)
	}
}

// request is one command the load sends, with the digest of the origin's answer.
type request struct {
	args map[string]any
	want [sha256.Size]byte
}

// keyspace is what the load asks for: hot keys, stored before the load starts, and fresh keys,
// each asked once, so that every one is a miss that fills (Place, upload, ReportFill).
type keyspace struct {
	hot   []request
	fresh []request
	next  atomic.Int64
}

// newKeyspace asks the origin directly for each key's answer. Keys are distinct per name.
func (r *rig) newKeyspace(name string, hot, fresh, size int) *keyspace {
	r.t.Helper()
	ks := &keyspace{hot: r.requests(name+"-hot", hot, size), fresh: r.requests(name+"-fresh", fresh, size)}
	return ks
}

func (r *rig) requests(prefix string, n, size int) []request {
	r.t.Helper()
	origin := &hgclient.Client{Base: r.originURL}
	out := make([]request, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				args := map[string]any{"nodes": []any{fmt.Sprintf("%s-%08d", prefix, i)}, "tree": "", "size": uint64(size)}
				res, err := origin.Command(context.Background(), command, args, nil)
				if err != nil {
					errs[i] = fmt.Errorf("the origin's answer for %s %d: %w", prefix, i, err)
					continue
				}
				out[i] = request{args: args, want: sha256.Sum256(res.Objects)}
			}
		}()
	}
	wg.Wait()
	r.must(errors.Join(errs...))
	return out
}

// warm asks the agent for every hot key and waits until each is answered with a redirect.
func (r *rig) warm(ks *keyspace) {
	r.t.Helper()
	c, rr := r.client(16)
	for _, q := range ks.hot {
		_, err := c.Command(context.Background(), command, q.args, rr)
		r.must(err)
	}
	testbed.Eventually(r.t, 30*time.Second, "every hot key redirected", func() bool {
		for _, q := range ks.hot {
			res, err := c.CommandNoFollow(context.Background(), command, q.args, rr)
			if err != nil || !res.Redirected {
				return false
			}
		}
		return true
	})
}

// client is a wire-protocol client of the agent that accepts the target.
func (r *rig) client(conns int) (*hgclient.Client, *wire.RedirectRequest) {
	tr := &http.Transport{MaxIdleConns: 2 * conns, MaxIdleConnsPerHost: conns, IdleConnTimeout: time.Minute}
	r.t.Cleanup(tr.CloseIdleConnections)
	return &hgclient.Client{Base: r.agent.URL, HTTP: &http.Client{Transport: tr, Timeout: time.Minute}},
		&wire.RedirectRequest{Targets: []string{target}, Hashes: []string{"sha256", "sha1"}}
}

// record is one request as the client saw it; times are since the load started.
type record struct {
	node       string // the request's node argument: which key
	client     int    // which of the load's clients sent it
	start, end time.Duration
	fetch      time.Duration // of a redirect: the location's fetch from the store
	redirected bool
	fresh      bool
	failed     bool // no answer, an error answer, or a location that could not be fetched
	fetchFail  bool // of failed: the agent answered with a redirect whose location failed
	wrong      bool // an answer whose bytes differ from the origin's
}

// load is a closed loop of clients through the agent.
type load struct {
	r      *rig
	c      *hgclient.Client
	rr     *wire.RedirectRequest
	ks     *keyspace
	t0     time.Time
	stop   chan struct{}
	wg     sync.WaitGroup
	mu     sync.Mutex
	recs   []record
	errs   []string
	stalls *stallMeter
	sent   atomic.Int64
}

type loadOptions struct {
	clients    int
	freshEvery int           // every n-th request is a fresh key (0: none)
	pause      time.Duration // a client's pause between requests
}

func (r *rig) startLoad(ks *keyspace, o loadOptions) *load {
	c, rr := r.client(o.clients)
	l := &load{r: r, c: c, rr: rr, ks: ks, t0: time.Now(), stop: make(chan struct{}), stalls: startStallMeter()}
	for w := range o.clients {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			local := make([]record, 0, 1024)
			for i := 0; ; i++ {
				select {
				case <-l.stop:
					l.mu.Lock()
					l.recs = append(l.recs, local...)
					l.mu.Unlock()
					return
				default:
				}
				q, fresh := l.pick(w, i, o.freshEvery)
				rec := l.one(q, fresh)
				rec.client = w
				local = append(local, rec)
				if o.pause > 0 {
					time.Sleep(o.pause)
				}
			}
		}()
	}
	return l
}

func (l *load) pick(w, i, freshEvery int) (request, bool) {
	if freshEvery > 0 && l.sent.Add(1)%int64(freshEvery) == 0 {
		if n := l.ks.next.Add(1) - 1; int(n) < len(l.ks.fresh) {
			return l.ks.fresh[n], true
		}
	}
	return l.ks.hot[(w*7919+i)%len(l.ks.hot)], false
}

func (l *load) one(q request, fresh bool) record {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rec := record{start: time.Since(l.t0), fresh: fresh}
	if nodes, ok := q.args["nodes"].([]any); ok && len(nodes) == 1 {
		rec.node, _ = nodes[0].(string)
	}
	res, err := l.c.Command(ctx, command, q.args, l.rr)
	rec.end = time.Since(l.t0)
	switch {
	case errors.Is(err, hgclient.ErrVerify):
		rec.wrong = true
	case err != nil:
		rec.failed = true
		rec.fetchFail = res != nil && res.Redirected
	case sha256.Sum256(res.Objects) != q.want:
		rec.wrong = true
	default:
		rec.redirected, rec.fetch = res.Redirected, res.Fetch
	}
	if err != nil || rec.wrong {
		l.mu.Lock()
		if len(l.errs) < 5 {
			l.errs = append(l.errs, fmt.Sprintf("at %s: %v (wrong bytes: %v)", rec.start.Round(time.Millisecond), err, rec.wrong))
		}
		l.mu.Unlock()
	}
	return rec
}

// now is the time since the load started.
func (l *load) now() time.Duration { return time.Since(l.t0) }

// finish stops the clients and returns what they got, in order of start.
func (l *load) finish() *figures {
	close(l.stop)
	l.wg.Wait()
	l.stalls.close()
	slices.SortFunc(l.recs, func(a, b record) int { return int(a.start - b.start) })
	return &figures{recs: l.recs, errs: l.errs, stalls: l.stalls, recovery: -1}
}

// figures summarize a load; recovery is set by the scenario (-1: none measured).
type figures struct {
	recs     []record
	errs     []string
	stalls   *stallMeter
	recovery time.Duration
	extra    string
}

func (f *figures) count(pred func(record) bool) int {
	n := 0
	for _, r := range f.recs {
		if pred(r) {
			n++
		}
	}
	return n
}

func (f *figures) failures() int { return f.count(func(r record) bool { return r.failed }) }
func (f *figures) wrong() int    { return f.count(func(r record) bool { return r.wrong }) }

// latency returns the q-quantile and the maximum of the latencies of the records that pass keep.
func (f *figures) latency(q float64, keep func(record) bool) (time.Duration, time.Duration) {
	var lat []time.Duration
	for _, r := range f.recs {
		if keep == nil || keep(r) {
			lat = append(lat, r.end-r.start)
		}
	}
	if len(lat) == 0 {
		return 0, 0
	}
	return quantile(lat, q), slices.Max(lat)
}

// quantile sorts lat and returns its q-quantile (0 for none).
func quantile(lat []time.Duration, q float64) time.Duration {
	if len(lat) == 0 {
		return 0
	}
	slices.Sort(lat)
	return lat[min(len(lat)-1, int(float64(len(lat))*q))]
}

// firstRedirectAfter is how long after mark the first redirect answered to a request started at
// or after mark completed.
func (f *figures) firstRedirectAfter(mark time.Duration) (time.Duration, bool) {
	best, ok := time.Duration(0), false
	for _, r := range f.recs {
		if r.start >= mark && r.redirected && (!ok || r.end-mark < best) {
			best, ok = r.end-mark, true
		}
	}
	return best, ok
}

// longestRedirectGap is the longest time within [from, to] in which no redirect answer completed.
func (f *figures) longestRedirectGap(from, to time.Duration) time.Duration {
	var ends []time.Duration
	for _, r := range f.recs {
		if r.redirected && r.end >= from && r.end <= to {
			ends = append(ends, r.end)
		}
	}
	slices.Sort(ends)
	prev, gap := from, time.Duration(0)
	for _, e := range append(ends, to) {
		gap = max(gap, e-prev)
		prev = e
	}
	return gap
}

// report prints the scenario's line of figures and fails the test on any failure or wrong bytes
// (unless allowFailures, for a scenario that accounts for its own).
func (f *figures) report(t *testing.T, name string, allowFailures bool) {
	t.Helper()
	p99, mx := f.latency(0.99, nil)
	red := f.count(func(r record) bool { return r.redirected })
	rec := "n/a"
	if f.recovery >= 0 {
		rec = f.recovery.Round(time.Millisecond).String()
	}
	line := fmt.Sprintf("chaos %-22s requests %6d  failures %d  wrong-bytes %d  redirected %5.1f%%  p99 %8s  max %8s  recovery %8s  stall-max %s",
		name, len(f.recs), f.failures(), f.wrong(), 100*float64(red)/float64(max(1, len(f.recs))),
		p99.Round(100*time.Microsecond), mx.Round(100*time.Microsecond), rec, f.stalls.max().Round(time.Millisecond))
	if f.extra != "" {
		line += "  " + f.extra
	}
	fmt.Println(line)
	if len(f.recs) == 0 {
		t.Fatal("the load sent no requests")
	}
	if f.wrong() > 0 || (!allowFailures && f.failures() > 0) {
		t.Fatalf("%d failures, %d wrong answers; first: %s", f.failures(), f.wrong(), strings.Join(f.errs, "; "))
	}
}

// stallMeter measures how late this process's goroutines get to run: a loop sleeps 1ms at a time
// and records every wake-up more than 5ms late. A client's latency includes such stalls, which are
// the machine's (other processes, the garbage collector), not the agent's.
type stallMeter struct {
	stop chan struct{}
	done chan struct{}
	mu   sync.Mutex
	at   []stall
}

type stall struct {
	from, to time.Time
}

func startStallMeter() *stallMeter {
	m := &stallMeter{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(m.done)
		for {
			select {
			case <-m.stop:
				return
			default:
			}
			t0 := time.Now()
			time.Sleep(time.Millisecond)
			if t1 := time.Now(); t1.Sub(t0) > 6*time.Millisecond {
				m.mu.Lock()
				m.at = append(m.at, stall{from: t0.Add(time.Millisecond), to: t1})
				m.mu.Unlock()
			}
		}
	}()
	return m
}

func (m *stallMeter) close() { close(m.stop); <-m.done }

func (m *stallMeter) max() time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	var d time.Duration
	for _, s := range m.at {
		d = max(d, s.to.Sub(s.from))
	}
	return d
}

// within is the total stall time that overlaps [from, to].
func (m *stallMeter) within(from, to time.Time) time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	var d time.Duration
	for _, s := range m.at {
		a, b := s.from, s.to
		if a.Before(from) {
			a = from
		}
		if b.After(to) {
			b = to
		}
		if b.After(a) {
			d += b.Sub(a)
		}
	}
	return d
}
