package hgbundle

// The clone-bundle front: Detour's answer to `clonebundles` for protocol-v1 clients (every
// Mercurial since 3.6), on the agent's core.
//
// Which bundles exist is derived, not recorded. A bundle covers the ancestors of one changeset,
// a checkpoint: the changeset with revision number k·S−1 for the largest k with k·S ≤ N, where N
// is the repository's number of changesets and S the step (Config.Step, or one that follows the
// repository's size). Its content key names the repository, that changeset and the bundle's
// format, so every agent in front of the same repository computes the same keys without asking
// anyone, and the control plane's fill claim makes one of them, fleet-wide, fetch the bundle
// from the origin (the getbundle a clone makes), store it and report it; it is verified like
// every object before anyone is sent to it. A manifest names the newest checkpoint whose bundle
// is READY, per format; until the newest one is READY, the one before it, or the newest one this
// agent has seen READY (after a push of many steps at once). The client applies the
// bundle and pulls the changesets after the checkpoint from the origin (at most about S, plus
// what arrived since).
//
// Checkpoints cut history from its start, so a repository that grows keeps its checkpoints:
// only every S new changesets make a new bundle, and a bundle nobody is sent to any more expires
// by the object TTL. When S doubles (the repository's size doubled), the newest checkpoint of
// the new step is one of the old step's too. Revision numbers are the origin's: an origin whose
// history is rewritten in place, or whose hidden changesets interrupt the numbering, gets fewer
// or other checkpoints, never a wrong bundle (the key names the changeset, not the number).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/detourhq/detour/internal/agent"
)

// MediaType is what bundles are stored and served as.
const MediaType = "application/x-mercurial-bundle"

// storeVersion is this front's version of what it stores (bump it to start over).
const storeVersion = 1

// Config configures the front. Zero fields take defaults.
type Config struct {
	// RepoID names the origin's repository in content keys (default: the origin's URL).
	RepoID string
	// Step is the number of changesets between checkpoints (0: follow the repository's size,
	// StepFor). A smaller step makes more bundles and leaves clones less to pull.
	Step int
	// Formats are the compressions bundles are made in (default zstd and gzip: every client
	// reads gzip, and those with zstd get the smaller zstd first).
	Formats []Compression
	// CapsTTL is how long the origin's capabilities are reused (default 1m); its heads are read
	// at every manifest request.
	CapsTTL time.Duration
	// MaxRepos bounds the repositories whose state the front remembers (default 1000).
	MaxRepos int
}

// StepFor is the default step for a repository of n changesets: 2^⌊log₂(n/16)⌋, at least 1 and at
// most 65536, so that a repository has 16 to 32 checkpoints and a clone pulls at most about 1/16
// of its history after the bundle. It changes only when the repository's size doubles.
func StepFor(n int) int {
	s := 1
	for s*2 <= n/16 && s < 65536 {
		s *= 2
	}
	return s
}

// Front answers `clonebundles` from placement and advertises it in the capabilities.
type Front struct {
	a   *agent.Agent
	cfg Config

	mu    sync.Mutex
	repos map[string]*repoState

	manifests *prometheus.CounterVec
	fills     *prometheus.CounterVec
}

// New makes the front for core a.
func New(a *agent.Agent, cfg Config) (*Front, error) {
	if cfg.RepoID == "" {
		cfg.RepoID = a.Origin().String()
	}
	if len(cfg.Formats) == 0 {
		cfg.Formats = []Compression{Zstd, Gzip}
	}
	for _, c := range cfg.Formats {
		if _, err := ParseCompression(string(c)); err != nil {
			return nil, fmt.Errorf("hgbundle: format: %w", err)
		}
	}
	if cfg.Step < 0 {
		return nil, fmt.Errorf("hgbundle: step %d: must be positive (0: follow the repository's size)", cfg.Step)
	}
	if cfg.CapsTTL <= 0 {
		cfg.CapsTTL = time.Minute
	}
	if cfg.MaxRepos <= 0 {
		cfg.MaxRepos = 1000
	}
	f := &Front{a: a, cfg: cfg, repos: map[string]*repoState{},
		manifests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_agent_bundle_manifests_total",
			Help: "Clone-bundle manifests answered, by result: bundles (at least one entry), empty, origin_denied, origin_error."}, []string{"result"}),
		fills: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_agent_bundle_fills_total",
			Help: "Bundles fetched from the origin into a store, by format and outcome (stored, failed)."}, []string{"format", "outcome"})}
	for _, c := range []prometheus.Collector{f.manifests, f.fills} {
		if err := a.Metrics().Registry.Register(c); err != nil {
			return nil, fmt.Errorf("hgbundle: metrics: %w", err)
		}
	}
	return f, nil
}

// Wrap answers the v1 capabilities (adding `clonebundles`) and the `clonebundles` command, and
// hands every other request to next.
func (f *Front) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || !f.a.Redirecting() {
			next.ServeHTTP(w, r)
			return
		}
		switch r.URL.Query().Get("cmd") {
		case "capabilities":
			f.serveCapabilities(w, r)
		case "clonebundles":
			f.serveManifest(w, r)
		default:
			next.ServeHTTP(w, r)
		}
	})
}

// maxCapsBytes bounds the capabilities body the front buffers to rewrite.
const maxCapsBytes = 1 << 20

// serveCapabilities relays the origin's capabilities, with `clonebundles` added to a v1 answer.
// Any other answer (an error, a refusal, protocol v2's CBOR handshake) is relayed as it is.
func (f *Front) serveCapabilities(w http.ResponseWriter, r *http.Request) {
	f.a.Count("capabilities")
	req, err := http.NewRequestWithContext(r.Context(), http.MethodGet, f.a.OriginURL(r), nil)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	req.Header = r.Header.Clone()
	resp, err := f.a.OriginClient().Do(req)
	if err != nil {
		f.a.OriginFailed(err)
		http.Error(w, "detour agent: origin unreachable", http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxCapsBytes+1))
	if err != nil {
		http.Error(w, "detour agent: origin capabilities unreadable", http.StatusBadGateway)
		return
	}
	if resp.StatusCode == http.StatusOK && strings.HasPrefix(resp.Header.Get("Content-Type"), "application/mercurial-0.1") && len(body) <= maxCapsBytes {
		if out, err := AddCloneBundles(body); err == nil {
			body = out
		}
	}
	for k, vs := range resp.Header {
		w.Header()[k] = vs
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(resp.StatusCode)
	// Counted before the client can have the answer (a client that then reads the metrics
	// finds it).
	f.a.CountBytes("capabilities", agent.BytesOrigin, int64(len(body)))
	_, _ = w.Write(body)
}

// serveManifest answers `clonebundles`: the READY bundles of the newest checkpoint that has
// them, best target first for this agent, filtered to what the client can apply. It is never an
// error: when anything on Detour's side or the origin's fails, the manifest is empty and the
// client clones normally.
func (f *Front) serveManifest(w http.ResponseWriter, r *http.Request) {
	repo := repoPath(r.URL.Path)
	entries, err := f.manifest(r, repo)
	switch {
	case errors.Is(err, errDenied):
		// The client gets the origin's own refusal, and authenticates after it.
		f.manifests.WithLabelValues("origin_denied").Inc()
		f.a.RelayAs(w, r, "origin_denied", "clonebundles")
		return
	case err != nil:
		f.manifests.WithLabelValues("origin_error").Inc()
		f.a.Once().Warn("bundle-state:"+repo, "cannot read the origin's repository state; answering an empty clone-bundle manifest",
			"repo", repo, "err", err)
	case len(entries) == 0:
		f.a.Once().Forget("bundle-state:" + repo)
		f.manifests.WithLabelValues("empty").Inc()
	default:
		f.a.Once().Forget("bundle-state:" + repo)
		f.manifests.WithLabelValues("bundles").Inc()
	}
	served := ForClient(entries, r.Header)
	body, err := EncodeManifest(served)
	if err != nil {
		f.a.Once().Warn("bundle-manifest", "cannot encode a clone-bundle manifest; answering an empty one", "err", err)
		body = nil
	}
	if len(entries) > 0 {
		f.a.Count("redirect")
		// The client applies the first bundle it can: those bytes come from the store.
		if body != nil && len(served) > 0 {
			f.a.CountBytes("clonebundles", agent.BytesStore, int64(served[0].size))
		}
	} else {
		f.a.Count("inline")
	}
	w.Header().Set("Content-Type", "application/mercurial-0.1")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}

var errDenied = errors.New("the origin refuses this client")

// checkpoint is one bundle's position: the repository's first revs changesets.
type checkpoint struct {
	revs int
	node Node
}

// manifest decides the entries for repo: for each format, the newest checkpoint's bundle if it
// is READY (and a fill of it if not, when admitted), else the previous checkpoints'.
func (f *Front) manifest(r *http.Request, repo string) ([]Entry, error) {
	st := f.state(repo)
	o := f.origin(repo, r)
	cps, caps, err := st.checkpoints(r.Context(), o, f.cfg.Step, f.cfg.CapsTTL)
	if err != nil || len(cps) == 0 {
		return nil, err
	}
	type found struct {
		entry Entry
		cp    checkpoint
		rank  int
	}
	var all []found
	var fills []formatFill // of the newest checkpoint
	for rank, c := range f.cfg.Formats {
		spec := c.BundleSpec()
		for i, cp := range cps {
			key, err := Key(KeyInput{RepoID: f.cfg.RepoID, RepoPath: repo, Heads: []Node{cp.node}, BundleSpec: spec, Version: storeVersion})
			if err != nil {
				return nil, err
			}
			// Only the newest checkpoint is ever filled; older ones are only looked up.
			d := f.a.Decide(r, agent.Query{Key: key, Command: "bundle", Repo: repo, MediaType: MediaType, NoFill: i > 0})
			switch d.Outcome {
			case agent.Denied:
				return nil, errDenied
			case agent.Fill:
				fills = append(fills, formatFill{c, d.Fill})
				continue
			case agent.Redirect:
				e := Entry{URL: d.Location.URL, BundleSpec: spec, RequiresSNI: strings.HasPrefix(d.Location.URL, "https:"), size: d.Location.Size}
				all = append(all, found{e, cp, rank})
			default:
				continue
			}
			break
		}
	}
	if len(fills) > 0 {
		f.fill(o, caps, cps[0], fills)
	}
	for _, x := range all {
		st.sawReady(x.cp)
	}
	// The newest bundles first; for equal checkpoints, the formats' order.
	sort.SliceStable(all, func(i, j int) bool {
		if all[i].cp.revs != all[j].cp.revs {
			return all[i].cp.revs > all[j].cp.revs
		}
		return all[i].rank < all[j].rank
	})
	out := make([]Entry, len(all))
	for i, x := range all {
		out[i] = x.entry
	}
	return out, nil
}

// formatFill is one granted fill of a checkpoint's bundle, in one format.
type formatFill struct {
	c    Compression
	fill *agent.FillWriter
}

// fill fetches the checkpoint's bundle from the origin once and compresses it into each granted
// fill, in the background: no client waits for it. A format whose fill fails drops out; the
// others go on.
func (f *Front) fill(o *Origin, caps Caps, cp checkpoint, fills []formatFill) {
	f.a.Go(func(context.Context) {
		var wg sync.WaitGroup
		outs := make([]*io.PipeWriter, len(fills))
		ctx := fills[0].fill.Context()
		for i, ff := range fills {
			pr, pw := io.Pipe()
			outs[i] = pw
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer ff.fill.Finish()
				err := Compress(ff.fill, pr, ff.c)
				pr.CloseWithError(err) // a failed format stops taking bytes
				if err != nil {
					ff.fill.Fail(fmt.Errorf("bundle of %d changesets: %w", cp.revs, err))
					f.fills.WithLabelValues(string(ff.c), "failed").Inc()
					f.a.Log().Warn("clone bundle not made", "key", ff.fill.Key(), "changesets", cp.revs, "format", string(ff.c), "err", err)
					return
				}
				f.fills.WithLabelValues(string(ff.c), "stored").Inc()
				f.a.Log().Info("clone bundle stored; it is advertised once the control plane has verified it", "key", ff.fill.Key(),
					"changesets", cp.revs, "format", string(ff.c))
			}()
		}
		err := func() error {
			b, err := o.FullBundle(ctx, caps, []Node{cp.node})
			if err != nil {
				return err
			}
			defer b.Body.Close()
			_, err = io.Copy(&fanout{outs: outs}, b.Body)
			return err
		}()
		for _, pw := range outs {
			pw.CloseWithError(err) // nil: the end of the bundle
		}
		wg.Wait()
	})
}

// fanout writes to every output that still takes bytes; it fails only when none does.
type fanout struct{ outs []*io.PipeWriter }

func (w *fanout) Write(p []byte) (int, error) {
	live := 0
	for i, o := range w.outs {
		if o == nil {
			continue
		}
		if _, err := o.Write(p); err != nil {
			w.outs[i] = nil
			continue
		}
		live++
	}
	if live == 0 {
		return 0, errors.New("every format of the bundle failed")
	}
	return len(p), nil
}

// origin is the repository repo on the origin, asked with the client's credentials (the only
// headers of the client's request it carries).
func (f *Front) origin(repo string, r *http.Request) *Origin {
	u := *f.a.Origin()
	u.Path, u.RawPath, u.RawQuery = agent.JoinPath(u.Path, repo), "", ""
	if u.Path == "" {
		u.Path = "/"
	}
	h := http.Header{}
	for _, name := range []string{"Authorization", "Cookie"} {
		if v := r.Header.Values(name); len(v) > 0 {
			h[name] = v
		}
	}
	return &Origin{URL: u.String(), Client: f.a.OriginClient(), Header: h, UserAgent: "mercurial/proto-1.0 (Detour agent)"}
}

// repoPath is the repository a `?cmd=` request addresses: its path, "" for the origin's root.
func repoPath(p string) string {
	if p == "/" {
		return ""
	}
	return strings.TrimSuffix(p, "/")
}

func (f *Front) state(repo string) *repoState {
	f.mu.Lock()
	defer f.mu.Unlock()
	st, ok := f.repos[repo]
	if !ok {
		if len(f.repos) >= f.cfg.MaxRepos {
			for k := range f.repos {
				delete(f.repos, k)
				break
			}
		}
		st = &repoState{nodes: map[int]Node{}}
		f.repos[repo] = st
	}
	return st
}

// repoState is what the front knows of one repository on the origin: its capabilities, its heads
// and the number of changesets they make, and the nodes of the checkpoints.
type repoState struct {
	mu     sync.Mutex
	caps   Caps
	capsAt time.Time
	heads  string // sorted hex, joined
	revs   int
	nodes  map[int]Node // revision number → node, for checkpoints
	// ready is the newest checkpoint a manifest found a READY bundle of: still a candidate after
	// a push of more than a step or two has moved the current checkpoints past every bundle made.
	ready checkpoint
}

// sawReady remembers cp as having a READY bundle if it is newer than the one remembered.
func (st *repoState) sawReady(cp checkpoint) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if cp.revs > st.ready.revs {
		st.ready = cp
	}
}

// maxNodes bounds the checkpoint nodes a repository's state remembers.
const maxNodes = 256

// checkpoints returns the repository's checkpoints newest first: the current step's newest and
// the one before it, and the previous step's newest when that differs (the newest READY bundle
// may be one of them while the newest checkpoint's is being made).
func (st *repoState) checkpoints(ctx context.Context, o *Origin, step int, capsTTL time.Duration) ([]checkpoint, Caps, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.caps == nil || time.Since(st.capsAt) > capsTTL {
		caps, err := o.Capabilities(ctx)
		if err != nil {
			return nil, nil, err
		}
		st.caps, st.capsAt = caps, time.Now()
	}
	heads, err := o.Heads(ctx, st.caps)
	if err != nil {
		return nil, nil, err
	}
	if len(heads) == 1 && heads[0] == NullNode {
		return nil, st.caps, nil // an empty repository
	}
	if id := strings.Join(sortedHex(heads), ","); id != st.heads {
		n, err := countRevs(ctx, o, st.caps, st.revs)
		if err != nil {
			return nil, nil, err
		}
		st.heads, st.revs = id, n
	}
	s := step
	if s == 0 {
		s = StepFor(st.revs)
	}
	var revs []int
	add := func(n int) {
		if n > 0 && !slices.Contains(revs, n) {
			revs = append(revs, n)
		}
	}
	add(st.revs / s * s)
	if s > 1 {
		add(st.revs / (s / 2) * (s / 2))
	}
	add(st.revs/s*s - s)
	sort.Sort(sort.Reverse(sort.IntSlice(revs)))
	out := make([]checkpoint, 0, len(revs)+1)
	for _, n := range revs {
		node, ok := st.nodes[n]
		if !ok {
			if node, err = o.Lookup(ctx, st.caps, strconv.Itoa(n-1)); err != nil {
				return nil, nil, err
			}
			if len(st.nodes) >= maxNodes {
				clear(st.nodes)
			}
			st.nodes[n] = node
		}
		out = append(out, checkpoint{revs: n, node: node})
	}
	if r := st.ready; r.revs > 0 && r.revs < out[len(out)-1].revs {
		out = append(out, r) // the oldest: looked up only when none of the current ones is READY
	}
	return out, st.caps, nil
}

// countRevs finds the number of changesets on the origin: the first revision number it does not
// resolve, by galloping up from known (a count that was right before; the repository grows) and
// bisecting the last gap. A handful of lookups after a push of a few changesets.
//
// Revision rev exists when "-(rev+1)" resolves: Mercurial reads a negative number as counted
// from the end. A positive number past the end would not do: the origin then tries it as a
// prefix of a changeset's hash ("9" names the changeset 9dd83e44… in a repository of 9), and
// names cannot be integers, so a negative one resolves only as a revision.
func countRevs(ctx context.Context, o *Origin, caps Caps, known int) (int, error) {
	exists := func(rev int) (bool, error) {
		_, err := o.Lookup(ctx, caps, strconv.Itoa(-rev-1))
		if errors.Is(err, ErrUnknownRevision) {
			return false, nil
		}
		return err == nil, err
	}
	lo := 0 // revisions [0, lo) exist
	if known > 0 {
		ok, err := exists(known - 1)
		if err != nil {
			return 0, err
		}
		if ok {
			lo = known
		}
	}
	hi, stride := lo, 1 // hi: a revision to try; once it is missing, the answer is in [lo, hi]
	for {
		ok, err := exists(hi)
		if err != nil {
			return 0, err
		}
		if !ok {
			break
		}
		lo = hi + 1
		hi, stride = lo+stride, stride*2
	}
	for lo < hi { // revisions [0, lo) exist; hi does not
		mid := lo + (hi-lo)/2
		ok, err := exists(mid)
		if err != nil {
			return 0, err
		}
		if ok {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return lo, nil
}
