package hgv2_test

// Tests of what keeps a live repository's clones cheap for the origin: batch sizes that follow the
// repository's size (learned from the origin and from clones), and misses relayed in the encoding
// the client accepts while the store gets the decoded objects.

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/front/hgv2"
	"github.com/detourhq/detour/internal/hgclient"
	"github.com/detourhq/detour/internal/wire"
)

func TestBatchSizeForFollowsTheRepositoryInPowersOfTwo(t *testing.T) {
	for _, c := range []struct {
		n    int64
		want uint64
	}{{0, 16}, {40, 16}, {511, 16}, {512, 32}, {1023, 32}, {1024, 64}, {1500, 64}, {5000, 256},
		{100000, 4096}, {1 << 20, 32768}, {1 << 30, 32768}} {
		if got := hgv2.BatchSizeFor(c.n); got != c.want {
			t.Errorf("BatchSizeFor(%d) = %d, want %d", c.n, got, c.want)
		}
	}
}

// vector reads one of the wire package's vectors of Mercurial 5.6.1's own encoded answers.
func vector(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "wire", "testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// liveOrigin is a v2 origin of the tests' own: the handshake of a real 5.6.1 hg serve, heads, a
// changesetdata that counts `changesets`, and a manifestdata answered with Mercurial 5.6.1's
// own frames of one answer (testdata/encoded/*-big.frames) in the first encoding of Mercurial's
// order the request offered. It records what it was asked.
type liveOrigin struct {
	t          testing.TB
	handshake  []byte
	mu         sync.Mutex
	changesets int64
	failProbe  bool
	commands   map[string]int
	offered    [][]string // content encodings offered, per manifestdata request
	garbage    bool       // answer manifestdata with a zlib stream that does not decode
}

func newLiveOrigin(t testing.TB, changesets int64) (*liveOrigin, string) {
	o := &liveOrigin{t: t, handshake: vector(t, "handshake-5.6.1.cbor"), changesets: changesets, commands: map[string]int{}}
	srv := httptest.NewServer(o)
	t.Cleanup(srv.Close)
	return o, srv.URL + "/"
}

func (o *liveOrigin) count(name string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.commands[name]
}

func (o *liveOrigin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet && r.URL.Query().Get("cmd") == "capabilities" {
		w.Header().Set("Content-Type", wire.MediaTypeCBOR)
		w.Write(o.handshake)
		return
	}
	name := r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]
	rs, err := wire.ReadRequest(r.Body, wire.ReaderOptions{})
	if err != nil || len(rs.Commands) != 1 {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	cmd := rs.Commands[0]
	o.mu.Lock()
	o.commands[name]++
	n, failProbe, garbage := o.changesets, o.failProbe, o.garbage
	if name == "manifestdata" {
		o.offered = append(o.offered, rs.ContentEncodings)
	}
	o.mu.Unlock()
	w.Header().Set("Content-Type", wire.MediaTypeFraming)
	rw := wire.NewResponseWriter(w, wire.DefaultMaxPayload)
	switch name {
	case "heads":
		rw.WriteOK(cmd.RequestID, []any{strings.Repeat("\x11", 20)})
	case "changesetdata":
		if _, fields := cmd.Args["fields"]; !fields && failProbe {
			http.Error(w, "no", http.StatusInternalServerError)
			return
		}
		objs := []any{map[string]any{"totalitems": n}}
		for i := int64(0); i < min(n, 100); i++ {
			objs = append(objs, map[string]any{"node": strings.Repeat(string(rune('a'+i%26)), 20)})
		}
		rw.WriteOK(cmd.RequestID, objs...)
	case "capabilities":
		var top struct {
			APIs map[string]wire.RawMessage `cbor:"apis"`
		}
		if err := wire.Unmarshal(o.handshake, &top); err != nil {
			o.t.Error(err)
		}
		rw.WriteStreamSettings(cmd.RequestID, wire.EncodingIdentity)
		rw.WriteValue(cmd.RequestID, wire.Status{Status: wire.StatusOK})
		rw.WriteData(cmd.RequestID, top.APIs[wire.APIVersion])
		rw.WriteEOS(cmd.RequestID)
	case "manifestdata":
		enc := wire.EncodingIdentity
		for _, e := range []string{wire.EncodingZstd8MB, wire.EncodingZlib} {
			if slices.Contains(rs.ContentEncodings, e) {
				enc = e
				break
			}
		}
		if garbage {
			enc = "zlib"
		}
		frames := vector(o.t, "encoded/"+strings.ReplaceAll(enc, "-", "")+"-big.frames")
		if garbage {
			frames = garble(o.t, frames)
		}
		w.Write(frames)
	default:
		rw.WriteCommandError(cmd.RequestID, "unknown command "+name)
	}
}

// garble flips bytes in the encoded payloads of a response, keeping its frames valid.
func garble(t testing.TB, frames []byte) []byte {
	out := bytes.Clone(frames)
	for off := 0; off+wire.HeaderSize <= len(out); {
		h, err := wire.ParseHeader(out[off:])
		if err != nil {
			t.Fatal(err)
		}
		p := out[off+wire.HeaderSize : off+wire.HeaderSize+int(h.Length)]
		if h.StreamFlags&wire.StreamEncoded != 0 {
			for i := len(p) / 3; i < len(p); i += 7 {
				p[i] ^= 0x5a
			}
		}
		off += wire.HeaderSize + int(h.Length)
	}
	return out
}

// startFront serves an agent without a control plane (it never redirects) with the v2 front
// configured by cfg, in front of origin, and returns its URL.
func startFront(t *testing.T, origin string, cfg hgv2.Config) string {
	t.Helper()
	u, _ := url.Parse(origin)
	a, err := agent.New(context.Background(), agent.Config{Origin: u, Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	f, err := hgv2.New(a, cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.Mount(f)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go a.Serve(lis)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		a.Shutdown(ctx)
	})
	return "http://" + lis.Addr().String() + "/"
}

// batchSizes decodes the recommendedbatchsize of manifestdata and filesdata from a v2
// capabilities map.
func batchSizes(t testing.TB, caps []byte) (manifests, files uint64) {
	t.Helper()
	var v2 struct {
		Commands map[string]struct {
			Size uint64 `cbor:"recommendedbatchsize"`
		} `cbor:"commands"`
	}
	if err := wire.Unmarshal(caps, &v2); err != nil {
		t.Fatal(err)
	}
	return v2.Commands["manifestdata"].Size, v2.Commands["filesdata"].Size
}

// handshakeSizes returns the batch sizes in the handshake base serves.
func handshakeSizes(t testing.TB, base string) (manifests, files uint64) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, base+"?cmd=capabilities", nil)
	req.Header.Set("X-HgUpgrade-1", wire.APIVersion)
	req.Header.Set("X-HgProto-1", "cbor")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var top struct {
		APIs map[string]wire.RawMessage `cbor:"apis"`
	}
	if err := wire.Unmarshal(body, &top); err != nil {
		t.Fatal(err)
	}
	return batchSizes(t, top.APIs[wire.APIVersion])
}

// cloneChangesets sends a clone's changesetdata (the whole DAG, every field a clone asks).
func cloneChangesets(t testing.TB, c *hgclient.Client, roots ...any) {
	t.Helper()
	if roots == nil {
		roots = []any{}
	}
	args := map[string]any{"revisions": []any{map[string]any{"type": "changesetdagrange", "roots": roots,
		"heads": []any{strings.Repeat("\x11", 20)}}}, "fields": wire.Set("bookmarks", "parents", "phase", "revision")}
	if _, err := c.Command(context.Background(), "changesetdata", args, nil); err != nil {
		t.Fatal(err)
	}
}

// The front advertises BatchSizeFor the repository's changesets: before the first handshake of a
// repository it asks the origin once (heads, then changesetdata), and clones keep it current; a
// pull teaches nothing (its answer counts only new changesets). The capabilities command says
// the same as the handshake.
func TestBatchSizesFollowTheRepository(t *testing.T) {
	o, origin := newLiveOrigin(t, 40)
	base := startFront(t, origin, hgv2.Config{})
	c := &hgclient.Client{Base: base}
	check := func(what string, want uint64) {
		t.Helper()
		if m, f := handshakeSizes(t, base); m != want || f != want {
			t.Fatalf("%s: handshake advertises manifestdata %d, filesdata %d; want %d", what, m, f, want)
		}
		res, err := c.Command(context.Background(), "capabilities", nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		if m, f := batchSizes(t, res.Objects); m != want || f != want {
			t.Fatalf("%s: capabilities command advertises manifestdata %d, filesdata %d; want %d", what, m, f, want)
		}
	}
	check("first handshake of a repository of 40 changesets", 16)
	check("second handshake", 16)
	if h, cs := o.count("heads"), o.count("changesetdata"); h != 1 || cs != 1 {
		t.Fatalf("the origin was asked heads %d and changesetdata %d times, want once each", h, cs)
	}

	o.mu.Lock()
	o.changesets = 5000
	o.mu.Unlock()
	check("before any clone saw the growth", 16)
	cloneChangesets(t, c)
	check("after a clone of 5000 changesets", 256)

	o.mu.Lock()
	o.changesets = 100000
	o.mu.Unlock()
	cloneChangesets(t, c, strings.Repeat("\x22", 20))
	check("after a pull", 256)
	if h := o.count("heads"); h != 1 {
		t.Fatalf("the origin was probed %d times", h)
	}

	t.Run("fixed by configuration", func(t *testing.T) {
		o, origin := newLiveOrigin(t, 40)
		base := startFront(t, origin, hgv2.Config{BatchSize: 64})
		if m, f := handshakeSizes(t, base); m != 64 || f != 64 {
			t.Fatalf("handshake advertises %d, %d; want 64", m, f)
		}
		if o.count("heads")+o.count("changesetdata") != 0 {
			t.Fatal("the origin was probed although the size is fixed")
		}
	})
	t.Run("the origin's when asked", func(t *testing.T) {
		_, origin := newLiveOrigin(t, 40)
		base := startFront(t, origin, hgv2.Config{BatchSize: -1})
		if m, f := handshakeSizes(t, base); m != 100000 || f != 50000 {
			t.Fatalf("handshake advertises %d, %d; want the origin's 100000, 50000", m, f)
		}
	})
	t.Run("the origin's until a clone shows the size when the probe fails", func(t *testing.T) {
		o, origin := newLiveOrigin(t, 700)
		o.failProbe = true
		base := startFront(t, origin, hgv2.Config{})
		for i := range 2 {
			if m, f := handshakeSizes(t, base); m != 100000 || f != 50000 {
				t.Fatalf("handshake %d advertises %d, %d; want the origin's 100000, 50000", i, m, f)
			}
		}
		if n := o.count("changesetdata"); n != 1 {
			t.Fatalf("a failed probe was tried %d times within a minute", n)
		}
		cloneChangesets(t, &hgclient.Client{Base: base})
		if m, f := handshakeSizes(t, base); m != 32 || f != 32 {
			t.Fatalf("after a clone of 700 changesets the handshake advertises %d, %d; want 32", m, f)
		}
	})
}

// rawCommand sends one command offering encodings (none: no settings frame) and returns the
// response body as the agent sent it, and its content key.
func rawCommand(t testing.TB, base, name string, encodings []string, args map[string]any, rr *wire.RedirectRequest) ([]byte, string) {
	t.Helper()
	var buf bytes.Buffer
	w := wire.NewRequestWriter(&buf)
	if encodings != nil {
		if err := w.WriteSettings(encodings...); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.WriteCommand(&wire.CommandRequest{RequestID: 1, Name: name, Args: args, Redirect: rr}); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPost, base+"api/"+wire.APIVersion+"/ro/"+name, &buf)
	req.Header.Set("Content-Type", wire.MediaTypeFraming)
	req.Header.Set("Accept", wire.MediaTypeFraming)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return body, resp.Header.Get(agent.HeaderContentKey)
}

// A miss is asked of the origin in the encodings the client offered (that the agent decodes, and
// identity), and the origin's frames reach the client byte for byte as the origin sent them; the
// store gets the decoded objects, exactly what a redirect then serves. A stream that does not
// decode fails the fill, not the client's answer. Bytes are counted by source.
func TestMissesRelayTheClientsEncodingAndStoreDecodedObjects(t *testing.T) {
	o, origin := newLiveOrigin(t, 40)
	s, c := startStackOpts(t, devstack.Options{OriginURL: origin})
	rr := redirectReq(t, c)
	objects := vector(t, "encoded/big.cbor")
	ctx := context.Background()
	for i, tc := range []struct {
		offer    []string
		upstream []string
		frames   string
	}{
		{[]string{"zstd-8mb", "zlib", "identity"}, []string{"zstd-8mb", "zlib", "identity"}, "zstd8mb"},
		{[]string{"zlib", "identity"}, []string{"zlib", "identity"}, "zlib"},
		{[]string{"zlib"}, []string{"zlib", "identity"}, "zlib"},
		{[]string{"identity"}, []string{"identity"}, "identity"},
		{[]string{"br", "identity"}, []string{"identity"}, "identity"},
		{nil, []string{"identity"}, "identity"},
	} {
		args := map[string]any{"tree": "", "nodes": []any{strings.Repeat(string(rune('A'+i)), 20)}}
		before := agentBytes(t, s)
		body, key := rawCommand(t, s.AgentURL, "manifestdata", tc.offer, args, rr)
		if want := vector(t, "encoded/"+tc.frames+"-big.frames"); !bytes.Equal(body, want) {
			t.Fatalf("offer %v: the client got %d bytes, not the origin's %d bytes of %s frames", tc.offer, len(body), len(want), tc.frames)
		}
		o.mu.Lock()
		offered := o.offered[len(o.offered)-1]
		o.mu.Unlock()
		if !slices.Equal(offered, tc.upstream) {
			t.Fatalf("offer %v: the origin was offered %v, want %v", tc.offer, offered, tc.upstream)
		}
		var res *hgclient.Result
		eventually(t, 10*time.Second, "a redirect once the fill is reported", func() bool {
			var err error
			res, err = c.Command(ctx, "manifestdata", args, rr)
			if err != nil {
				t.Fatal(err)
			}
			return res.Redirected
		})
		if !bytes.Equal(res.Objects, objects) {
			t.Fatalf("offer %v: the stored object (%d bytes) is not the identity answer (%d bytes)", tc.offer, len(res.Objects), len(objects))
		}
		after := agentBytes(t, s)
		if d := after["manifestdata/origin"] - before["manifestdata/origin"]; d < float64(len(body)) {
			t.Fatalf("offer %v: %v origin bytes counted for a %d-byte relay", tc.offer, d, len(body))
		}
		if d := after["manifestdata/filled"] - before["manifestdata/filled"]; d != float64(len(objects)) {
			t.Fatalf("offer %v: %v filled bytes counted, want %d", tc.offer, d, len(objects))
		}
		if d := after["manifestdata/store"] - before["manifestdata/store"]; d < float64(len(objects)) {
			t.Fatalf("offer %v: %v store bytes counted after a redirect of %d", tc.offer, d, len(objects))
		}
		if key == "" {
			t.Fatal("no content key on the answer")
		}
	}

	// Commands that are never stored are relayed and counted under their names; requests that
	// are not the front's under "other".
	before := agentBytes(t, s)
	if _, err := c.Command(ctx, "heads", nil, rr); err != nil {
		t.Fatal(err)
	}
	// The answer is read to its end: Get returns with the headers, and the bytes are counted as
	// they are written.
	resp, err := http.Get(s.AgentURL + "?cmd=heads")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	after := agentBytes(t, s)
	if after["heads/origin"] <= before["heads/origin"] || after["other/origin"] <= before["other/origin"] {
		t.Fatalf("relayed bytes not counted by command: %v → %v", before, after)
	}

	// An encoded stream that does not decode: relayed as it is, and nothing stored.
	o.mu.Lock()
	o.garbage = true
	o.mu.Unlock()
	aborted := agentCount(t, s, "detour_agent_fills_total", "outcome", "aborted")
	args := map[string]any{"tree": "", "nodes": []any{strings.Repeat("Z", 20)}}
	body, key := rawCommand(t, s.AgentURL, "manifestdata", []string{"zlib", "identity"}, args, rr)
	if want := garble(t, vector(t, "encoded/zlib-big.frames")); !bytes.Equal(body, want) {
		t.Fatalf("a stream that does not decode reached the client changed (%d bytes, want %d)", len(body), len(want))
	}
	eventually(t, 10*time.Second, "the fill aborted", func() bool {
		return agentCount(t, s, "detour_agent_fills_total", "outcome", "aborted") > aborted
	})
	list, err := s.Admin.ListObjects(ctx, &pb.ListObjectsRequest{KeyPrefix: key})
	if err != nil || len(list.Objects) != 0 {
		t.Fatalf("objects stored from a stream that does not decode: %v %v", list, err)
	}
}

// agentBytes returns detour_agent_response_bytes_total by "command/source".
func agentBytes(t *testing.T, s *devstack.Stack) map[string]float64 {
	t.Helper()
	families, err := s.Agent.Metrics().Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, f := range families {
		if f.GetName() != "detour_agent_response_bytes_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			var cmd, src string
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "command":
					cmd = l.GetValue()
				case "source":
					src = l.GetValue()
				}
			}
			out[cmd+"/"+src] += m.GetCounter().GetValue()
		}
	}
	return out
}

// A batch is transient when it is not a full batch of the advertised size: the newest, partial
// batch of a clone, and a pull's batches. Only what the front can count is marked.
func TestTransientBatchIsAnythingButAFullBatch(t *testing.T) {
	nodes := func(n int) []any {
		out := make([]any, n)
		for i := range out {
			out[i] = strings.Repeat(string(rune('a'+i%26)), 20)
		}
		return out
	}
	manifests := func(n int) *wire.CommandRequest {
		return &wire.CommandRequest{Name: "manifestdata", Args: map[string]any{"tree": "", "nodes": nodes(n)}}
	}
	files := func(specs ...any) *wire.CommandRequest {
		return &wire.CommandRequest{Name: "filesdata", Args: map[string]any{"revisions": specs}}
	}
	explicit := func(n int) map[string]any { return map[string]any{"type": "changesetexplicit", "nodes": nodes(n)} }
	for _, c := range []struct {
		what string
		cmd  *wire.CommandRequest
		b    uint64
		want bool
	}{
		{"a full manifestdata batch", manifests(16), 16, false},
		{"the partial manifestdata batch", manifests(8), 16, true},
		{"a manifestdata of one node (a pull of one changeset)", manifests(1), 16, true},
		{"more than a batch (the origin's sizes were advertised)", manifests(40), 16, true},
		{"a full filesdata batch", files(explicit(64)), 64, false},
		{"the partial filesdata batch", files(explicit(63)), 64, true},
		{"batch size unknown", manifests(8), 0, false},
		{"filesdata of a DAG range: not counted", files(map[string]any{"type": "changesetdagrange", "roots": []any{}, "heads": nodes(1)}), 16, false},
		{"filesdata of two specifiers: not counted", files(explicit(8), explicit(8)), 16, false},
		{"manifestdata without nodes: not counted", &wire.CommandRequest{Name: "manifestdata", Args: map[string]any{"tree": ""}}, 16, false},
		{"another command", &wire.CommandRequest{Name: "filedata", Args: map[string]any{"nodes": nodes(3)}}, 16, false},
	} {
		if got := hgv2.TransientBatch(c.cmd, c.b); got != c.want {
			t.Errorf("%s (batch size %d): transient %v, want %v", c.what, c.b, got, c.want)
		}
	}
}

// Through the real control plane: a fill of a partial manifestdata batch (of the size the front
// advertised for the repository) is stored as a transient object, a fill of a full batch is not.
func TestPartialBatchesAreStoredTransient(t *testing.T) {
	_, origin := newLiveOrigin(t, 40) // batch size 16
	s, c := startStackOpts(t, devstack.Options{OriginURL: origin})
	rr := redirectReq(t, c) // the handshake: the front learns the repository's size
	ctx := context.Background()
	nodes := func(n int, first rune) []any {
		out := make([]any, n)
		for i := range out {
			out[i] = strings.Repeat(string(first+rune(i)), 20)
		}
		return out
	}
	for _, tc := range []struct {
		what      string
		nodes     []any
		transient bool
	}{
		{"a full batch", nodes(16, 'A'), false},
		{"the partial batch", nodes(8, 'a'), true},
	} {
		args := map[string]any{"tree": "", "nodes": tc.nodes}
		_, key := rawCommand(t, s.AgentURL, "manifestdata", []string{"zlib", "identity"}, args, rr)
		if key == "" {
			t.Fatalf("%s: no content key on the answer", tc.what)
		}
		var obj *pb.StoredObject
		eventually(t, 10*time.Second, tc.what+" stored", func() bool {
			list, err := s.Admin.ListObjects(ctx, &pb.ListObjectsRequest{KeyPrefix: key})
			if err != nil {
				t.Fatal(err)
			}
			if len(list.Objects) == 1 {
				obj = list.Objects[0]
			}
			return obj != nil
		})
		if obj.Transient != tc.transient {
			t.Errorf("%s of 16: stored transient=%v, want %v", tc.what, obj.Transient, tc.transient)
		}
	}
}
