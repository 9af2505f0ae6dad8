package hgv2

// Cache-aligned batches.
//
// A Mercurial client fetches manifestdata and filesdata in batches of the recommendedbatchsize
// each command advertises, cut from the start of a list in revision order
// (mercurial/exchangev2.py). A batch keeps its arguments, hence its content key, until the
// repository grows past it: after new changesets only the last, partial batch and the new ones are
// new keys. With Mercurial's own sizes (50 000 changesets, 100 000 manifests) almost every
// repository is one batch, and every new changeset makes the whole clone a miss.
//
// The front advertises B = 2^⌊log₂(N/16)⌋ for both commands, at least 16 and at most 32768, N the
// repository's changesets (bench/RESULTS.md, "Batch sizes of a growing repository"): 16 to 32
// batches per command whatever the size, so a new changeset re-fetches about 1/64 to 1/32 of a
// clone, and B changes only when N doubles (every key changes once then). N is learned per
// repository: from every clone the front relays (the answer to a changesetdata request from no
// roots starts with {totalitems: N}) and, for a repository the front has not seen, by asking the
// origin once before answering the first handshake (heads, then a changesetdata of the whole DAG
// with no fields, read only up to its first object). A restarted agent asks again and, N being
// the same, advertises the same B: its keys, and the store's objects, stay warm.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/wire"
)

// Bounds of the batch-size rule.
const (
	MinBatchSize = 16
	MaxBatchSize = 32768
)

// BatchSizeFor is the batch size the front advertises for a repository of n changesets:
// 2^⌊log₂(n/16)⌋, within [MinBatchSize, MaxBatchSize].
func BatchSizeFor(n int64) uint64 {
	q := uint64(max(n, 0)) / 16
	if q < MinBatchSize {
		return MinBatchSize
	}
	b := uint64(1) << (bits.Len64(q) - 1)
	return min(b, MaxBatchSize)
}

// batchedCommands are the commands whose advertised batch size the front sets.
var batchedCommands = []string{"manifestdata", "filesdata"}

// maxSizedRepos bounds the repositories whose sizes the front remembers (repository paths come
// from clients, although only those the origin answered a v2 handshake for are kept).
const maxSizedRepos = 1024

// Timings of the origin probe.
const (
	probeRetry = time.Minute     // after a failed probe, the next one waits this long
	probeMax   = 2 * time.Minute // a probe's own deadline, whoever waits for it
)

// sizer remembers the repositories' sizes and runs the probes.
type sizer struct {
	mu    sync.Mutex
	repos map[string]*repoSize
}

type repoSize struct {
	n       int64         // changesets; 0 unknown
	probe   chan struct{} // closed when the probe in flight ends; nil when none runs
	failed  time.Time     // when the last probe failed
	learned string        // how n was learned: "probe" or "clone"
}

func (s *sizer) entry(repo string) *repoSize {
	if s.repos == nil || len(s.repos) >= maxSizedRepos && s.repos[repo] == nil {
		s.repos = map[string]*repoSize{}
	}
	e := s.repos[repo]
	if e == nil {
		e = &repoSize{}
		s.repos[repo] = e
	}
	return e
}

// learn records that repo has at least n changesets.
func (s *sizer) learn(repo string, n int64, how string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.entry(repo); n > e.n {
		e.n, e.learned = n, how
	}
}

// known returns the changesets known for repo (0: unknown).
func (s *sizer) known(repo string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.repos[repo]; e != nil {
		return e.n
	}
	return 0
}

// batchSize returns the batch size to advertise for repo in the handshake answering r, or 0 to
// leave the origin's. An unknown repository is probed first (once at a time, and not again
// within probeRetry of a failure), for at most the configured probe timeout.
func (f *Front) batchSize(r *http.Request, repo string) uint64 {
	switch {
	case f.cfg.BatchSize > 0:
		return uint64(f.cfg.BatchSize)
	case f.cfg.BatchSize < 0:
		return 0
	}
	s := &f.sizes
	s.mu.Lock()
	e := s.entry(repo)
	if e.n > 0 {
		n := e.n
		s.mu.Unlock()
		return BatchSizeFor(n)
	}
	done := e.probe
	if done == nil {
		if time.Since(e.failed) < probeRetry {
			s.mu.Unlock()
			f.batchSizes.WithLabelValues("origin_unknown_size").Inc()
			return 0
		}
		done = make(chan struct{})
		e.probe = done
		header := probeHeader(r.Header)
		f.a.Go(func(ctx context.Context) {
			ctx, cancel := context.WithTimeout(ctx, probeMax)
			defer cancel()
			n, err := f.countChangesets(ctx, repo, header)
			s.mu.Lock()
			e := s.entry(repo)
			if err == nil && n > e.n {
				e.n, e.learned = n, "probe"
			}
			if err != nil {
				e.failed = time.Now()
			}
			e.probe = nil
			s.mu.Unlock()
			close(done)
			if err != nil {
				f.a.Once().Warn("size-probe:"+repo, "cannot count the repository's changesets; advertising the origin's batch sizes until a clone shows them",
					"repo", repo, "err", err)
				return
			}
			f.a.Once().Forget("size-probe:" + repo)
			f.a.Log().Info("repository size learned from the origin", "repo", repo, "changesets", n, "batch_size", BatchSizeFor(n))
		})
	}
	s.mu.Unlock()
	t := time.NewTimer(f.cfg.SizeProbeTimeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	case <-r.Context().Done():
	}
	if n := s.known(repo); n > 0 {
		return BatchSizeFor(n)
	}
	f.batchSizes.WithLabelValues("origin_unknown_size").Inc()
	return 0
}

// probeHeader is what a probe sends the origin of the client's handshake headers: its
// credentials and the like, not what describes the handshake itself.
func probeHeader(h http.Header) http.Header {
	out := http.Header{}
	for k, vs := range h {
		switch ck := http.CanonicalHeaderKey(k); {
		case strings.HasPrefix(ck, "X-Hg"), strings.HasPrefix(ck, "Accept"), strings.HasPrefix(ck, "Content-"),
			ck == "Connection", ck == "Upgrade", ck == "Te", ck == "Trailer", ck == "Transfer-Encoding":
		default:
			out[ck] = append([]string(nil), vs...)
		}
	}
	return out
}

// countChangesets asks the origin how many changesets repo has: its heads, then a changesetdata
// of the whole DAG without fields, whose first object is {totalitems: N} (the rest, about 25 bytes
// a changeset, is not read).
func (f *Front) countChangesets(ctx context.Context, repo string, header http.Header) (int64, error) {
	var heads []string
	if err := f.probeCommand(ctx, repo, header, "heads", map[string]any{}, &heads); err != nil {
		return 0, err
	}
	var first struct {
		TotalItems *int64 `cbor:"totalitems"`
	}
	args := map[string]any{"revisions": []any{map[string]any{"type": "changesetdagrange", "roots": []any{}, "heads": heads}}}
	if err := f.probeCommand(ctx, repo, header, "changesetdata", args, &first); err != nil {
		return 0, err
	}
	if first.TotalItems == nil || *first.TotalItems < 0 {
		return 0, errors.New("changesetdata: the first object has no totalitems")
	}
	return *first.TotalItems, nil
}

// probeCommand sends one read-only command to the origin for repo and decodes the first object of
// its answer into v.
func (f *Front) probeCommand(ctx context.Context, repo string, header http.Header, name string, args map[string]any, v any) error {
	var body bytes.Buffer
	rw := wire.NewRequestWriter(&body)
	if err := rw.WriteSettings(wire.EncodingIdentity); err != nil {
		return err
	}
	if err := rw.WriteCommand(&wire.CommandRequest{RequestID: 1, Name: name, Args: args}); err != nil {
		return err
	}
	u := *f.a.Origin()
	u.Path = agent.JoinPath(u.Path, repo+commandPathMarker+"ro/"+name)
	u.RawPath, u.RawQuery = "", ""
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), &body)
	if err != nil {
		return err
	}
	for k, vs := range header {
		req.Header[k] = vs
	}
	req.Header.Set("Content-Type", wire.MediaTypeFraming)
	req.Header.Set("Accept", wire.MediaTypeFraming)
	resp, err := f.a.OriginClient().Do(req)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: origin answered HTTP %d", name, resp.StatusCode)
	}
	rr, err := wire.ReadResponse(resp.Body, 1, wire.ReaderOptions{MaxPayload: wire.MaxPayloadLimit})
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	defer rr.Close()
	if st := rr.Status(); st == nil || st.Status != wire.StatusOK {
		return fmt.Errorf("%s: origin answered a non-ok status", name)
	}
	// The first object, read piece by piece: the rest of the answer may be large.
	var head []byte
	buf := make([]byte, 4096)
	for len(head) < maxProbeObject {
		n, err := rr.Read(buf)
		head = append(head, buf[:n]...)
		if _, derr := wire.UnmarshalFirst(head, v); derr == nil {
			return nil
		} else if !errors.Is(derr, wire.ErrIncomplete) {
			return fmt.Errorf("%s: %w", name, derr)
		}
		if err == io.EOF {
			return fmt.Errorf("%s: the answer has no object", name)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	return fmt.Errorf("%s: first object larger than %d bytes", name, maxProbeObject)
}

// maxProbeObject bounds the first object of a probe's answer (the heads: 20 bytes each).
const maxProbeObject = 16 << 20

// fullDAG reports whether a changesetdata request asks for a repository's whole history (a
// clone: one DAG range from no roots), whose answer's first object counts every changeset.
func fullDAG(cmd *wire.CommandRequest) bool {
	revs, ok := cmd.Args["revisions"].([]any)
	if !ok || len(revs) != 1 {
		return false
	}
	spec, ok := revs[0].(map[string]any)
	if !ok || spec["type"] != "changesetdagrange" {
		return false
	}
	roots, ok := spec["roots"].([]any)
	if !ok {
		return false
	}
	for _, r := range roots {
		if r != nullNode {
			return false
		}
	}
	return true
}

var nullNode = string(make([]byte, 20))

// totalItems reads the first object of a changesetdata answer, {totalitems: N}, from the object
// bytes handed on piece by piece; it returns errStopObserving once it has it (or cannot have it).
type totalItems struct {
	head []byte
	n    int64
}

var errStopObserving = errors.New("observed enough")

func (t *totalItems) observe(p []byte) error {
	t.head = append(t.head, p...)
	var first struct {
		TotalItems *int64 `cbor:"totalitems"`
	}
	_, err := wire.UnmarshalFirst(t.head, &first)
	switch {
	case errors.Is(err, wire.ErrIncomplete) && len(t.head) < 4096:
		return nil
	case err == nil && first.TotalItems != nil:
		t.n = *first.TotalItems
	}
	t.head = nil
	return errStopObserving
}

// Superseded batches.
//
// A full batch of the advertised size keeps its key while the repository grows; any other batch
// does not: the newest, partial batch is re-keyed by the next push (it gains the new changesets),
// and a pull's batches start at the puller's own base. The front marks these transient
// (agent.Query.Transient), so that their fills expire after the policy's transient_object_ttl
// rather than its object_ttl: the store then holds a growing repository's full batches and its
// current partial ones, not every partial batch a push superseded. A batch that is still asked
// for is extended like any other object, so a partial batch of a repository that stops growing
// lives on while clones use it.

// advertisedBatchSize is the batch size the front advertises for repo now, or 0 when it does not
// know it (the origin's sizes are advertised, or the repository's size is not known yet). It
// never waits for a probe.
func (f *Front) advertisedBatchSize(repo string) uint64 {
	switch {
	case f.cfg.BatchSize > 0:
		return uint64(f.cfg.BatchSize)
	case f.cfg.BatchSize < 0:
		return 0
	}
	if n := f.sizes.known(repo); n > 0 {
		return BatchSizeFor(n)
	}
	return 0
}

// TransientBatch reports whether cmd asks for a manifestdata or filesdata batch that is not a full
// batch of size b (b 0: unknown, and nothing is marked): its answer's key is likely replaced by the
// repository's next change. A request whose batch the front cannot count (a filesdata that names
// its changesets otherwise than by one explicit list) is not marked.
func TransientBatch(cmd *wire.CommandRequest, b uint64) bool {
	if b == 0 {
		return false
	}
	n, ok := batchLen(cmd)
	return ok && uint64(n) != b
}

// batchLen is the number of items of a manifestdata or filesdata request's batch: the manifest
// nodes, or the changesets of its one changesetexplicit revision specifier (what Mercurial's
// client sends, mercurial/exchangev2.py).
func batchLen(cmd *wire.CommandRequest) (int, bool) {
	switch cmd.Name {
	case "manifestdata":
		nodes, ok := cmd.Args["nodes"].([]any)
		return len(nodes), ok
	case "filesdata":
		revs, ok := cmd.Args["revisions"].([]any)
		if !ok || len(revs) != 1 {
			return 0, false
		}
		spec, ok := revs[0].(map[string]any)
		if !ok || spec["type"] != "changesetexplicit" {
			return 0, false
		}
		nodes, ok := spec["nodes"].([]any)
		return len(nodes), ok
	}
	return 0, false
}
