package hgv2_test

import (
	"bytes"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/controlplane"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/hgclient"
	"github.com/detourhq/detour/internal/testbed"
	"github.com/detourhq/detour/internal/wire"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// placeTimeout is the agent's Place deadline in these tests: generous, because under the race
// detector on a loaded machine a first Place over a new mTLS connection can take longer than the
// production default of 50ms, and a test about fills or redirects must not become a test of
// latency. The latency tests use fastPlace.
const (
	placeTimeout = 2 * time.Second
	fastPlace    = 50 * time.Millisecond
)

func startStack(t *testing.T) (*devstack.Stack, *hgclient.Client) {
	return startStackWith(t, placeTimeout)
}

func startStackWith(t *testing.T, placeTimeout time.Duration) (*devstack.Stack, *hgclient.Client) {
	t.Helper()
	s, err := devstack.Start(context.Background(), devstack.Options{DataDir: t.TempDir(), ObjectSize: 200 << 10,
		PlaceTimeout: placeTimeout, Log: quiet})
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

func redirectReq(t *testing.T, c *hgclient.Client) *wire.RedirectRequest {
	t.Helper()
	hs, err := c.Capabilities(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	acc := hgclient.Accepted(hs.Redirect, "http", "https")
	if len(acc) == 0 {
		t.Fatal("agent advertises no targets")
	}
	return &wire.RedirectRequest{Targets: acc, Hashes: []string{"sha256", "sha1"}}
}

func args(node string, size int) map[string]any {
	return map[string]any{"nodes": []any{strings.Repeat(node, 20)[:20]}, "tree": "", "size": size}
}

var eventually = testbed.Eventually

// objectCount counts the stored responses in the stack's bucket (not the prober's canary).
func objectCount(t *testing.T, s *devstack.Stack) int {
	t.Helper()
	names, err := s.GCS.ObjectNames("detour-demo")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, name := range names {
		if !strings.HasSuffix(name, controlplane.CanaryName) {
			n++
		}
	}
	return n
}

func TestFirstRequestFillsThenRedirectsToIdenticalBytes(t *testing.T) {
	s, c := startStack(t)
	ctx := context.Background()
	rr := redirectReq(t, c)
	first, err := c.Command(ctx, "manifestdata", args("a", 300000), rr)
	if err != nil {
		t.Fatal(err)
	}
	if first.Redirected {
		t.Fatal("first request was redirected before anything was stored")
	}
	objs, err := wire.DecodeObjects(first.Objects)
	if err != nil || len(objs) != 6 { // totalitems + 5 chunks of at most 64 KiB
		t.Fatalf("inline objects: %d, %v", len(objs), err)
	}
	var second *hgclient.Result
	eventually(t, 5*time.Second, "a redirect once the fill is reported", func() bool {
		second, err = c.Command(ctx, "manifestdata", args("a", 300000), rr)
		if err != nil {
			t.Fatal(err)
		}
		return second.Redirected
	})
	if !bytes.Equal(second.Objects, first.Objects) {
		t.Fatalf("redirected bytes (%d) differ from the inline bytes (%d)", len(second.Objects), len(first.Objects))
	}
	if strings.Join(second.Verified, ",") != "sha256,sha1" {
		t.Fatalf("verified hashes: %v", second.Verified)
	}
	list, err := s.Admin.ListObjects(ctx, &pb.ListObjectsRequest{})
	if err != nil || len(list.Objects) != 1 {
		t.Fatalf("objects: %v %v", list, err)
	}
	o := list.Objects[0]
	s256, s1 := sha256.Sum256(first.Objects), sha1.Sum(first.Objects)
	if o.Size != uint64(len(first.Objects)) || !bytes.Equal(o.Sha256, s256[:]) || !bytes.Equal(o.Sha1, s1[:]) || o.MediaType != wire.MediaTypeCBOR {
		t.Fatalf("stored object record %v does not describe the inline bytes", o)
	}
	stored, err := s.GCS.Object("detour-demo", o.ObjectName)
	if err != nil || !bytes.Equal(stored, first.Objects) {
		t.Fatalf("bytes in the store differ: %v", err)
	}
	before := s.Origin.Requests("manifestdata")
	if third, err := c.Command(ctx, "manifestdata", args("a", 300000), rr); err != nil || !third.Redirected {
		t.Fatalf("third request: %v", err)
	}
	if n := s.Origin.Requests("manifestdata"); n != before {
		t.Fatalf("a redirected request reached the origin (%d → %d requests)", before, n)
	}
	// A client that sent no redirect map gets the inline answer, identical.
	plain, err := c.Command(ctx, "manifestdata", args("a", 300000), nil)
	if err != nil || plain.Redirected || !bytes.Equal(plain.Objects, first.Objects) {
		t.Fatalf("client without redirect: redirected=%v err=%v", plain != nil && plain.Redirected, err)
	}
}

func TestClientsWithoutRedirectAlwaysGetInline(t *testing.T) {
	s, c := startStack(t)
	ctx := context.Background()
	for i := range 3 {
		res, err := c.Command(ctx, "filedata", args("b", 100000), nil)
		if err != nil || res.Redirected || len(res.Objects) < 100000 {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	if n := outcomes(t, s, "inline_fill", "inline", "redirect"); n != 0 {
		t.Fatalf("%v requests of a client that cannot be redirected went to placement", n)
	}
	if n := objectCount(t, s); n != 0 {
		t.Fatalf("%d objects stored for a client that cannot be redirected", n)
	}
	// Non-cacheable commands pass through.
	if res, err := c.Command(ctx, "heads", nil, redirectReq(t, c)); err != nil || res.Redirected {
		t.Fatalf("heads: %v", err)
	}
}

func TestControlPlaneDownAnswersInlineWithinPlaceTimeout(t *testing.T) {
	s, c := startStackWith(t, fastPlace)
	ctx := context.Background()
	rr := redirectReq(t, c)
	// Warm: the origin's cost of a small response, measured directly.
	direct := &hgclient.Client{Base: s.OriginURL}
	base, err := direct.Command(ctx, "manifestdata", args("c", 1000), nil)
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	s.CP.Shutdown(sctx)
	cancel()
	for i := range 5 {
		res, err := c.Command(ctx, "manifestdata", args(fmt.Sprint("d", i), 1000), rr)
		if err != nil {
			t.Fatalf("request %d with the control plane down: %v", i, err)
		}
		if res.Redirected {
			t.Fatal("redirected with the control plane down")
		}
		if limit := base.Elapsed + fastPlace + 400*time.Millisecond; res.Elapsed > limit {
			t.Fatalf("request %d took %s with the control plane down, limit %s", i, res.Elapsed, limit)
		}
	}
}

func TestConcurrentFirstRequestsUploadOnce(t *testing.T) {
	// A generous place timeout: this test is about fill claims, not latency (20 requests at once
	// under the race detector can exceed 50 ms, and then nobody fills at all).
	s, c := startStackWith(t, 5*time.Second)
	ctx := context.Background()
	rr := redirectReq(t, c)
	var wg sync.WaitGroup
	results := make([][]byte, 20)
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := c.Command(ctx, "filesdata", args("e", 500000), rr)
			if err != nil {
				t.Error(err)
				return
			}
			results[i] = res.Objects
		}()
	}
	wg.Wait()
	for i := range results {
		if !bytes.Equal(results[i], results[0]) {
			t.Fatalf("response %d differs", i)
		}
	}
	eventually(t, 5*time.Second, "the one upload", func() bool { return objectCount(t, s) == 1 })
	if n := outcomes(t, s, "inline_fill"); n != 1 {
		t.Fatalf("%v of 20 concurrent first requests started a fill, want 1", n)
	}
	if n := objectCount(t, s); n != 1 {
		t.Fatalf("%d uploads for one key", n)
	}
}

// A draining target stays advertised and keeps serving the copies it has (there is no other
// target here to hold them), but gets no new fills; a disabled one is withdrawn at once.
func TestDrainingTargetServesWhatItHasAndGetsNoFills(t *testing.T) {
	s, c := startStack(t)
	ctx := context.Background()
	rr := redirectReq(t, c)
	stored, err := c.Command(ctx, "manifestdata", args("k", 100000), rr)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the key READY before the drain", func() bool {
		list, err := s.Admin.ListObjects(ctx, &pb.ListObjectsRequest{})
		return err == nil && len(list.Objects) == 1
	})
	if _, err := s.Admin.SetTargetState(ctx, &pb.SetTargetStateRequest{Name: "local-gcs", State: pb.TargetState_TARGET_STATE_DRAINING}); err != nil {
		t.Fatal(err)
	}
	// An admin read waits for the replica's own write, so placement sees the drain from here on.
	got, err := s.Admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "local-gcs"})
	if err != nil || got.Target.State != pb.TargetState_TARGET_STATE_DRAINING || got.Target.Drain.GetSoleCopies() != 1 || got.Target.Drain.GetCopies() != 1 {
		t.Fatalf("draining target with one copy and nowhere else to hold it: %v %v", got, err)
	}
	hs, err := c.Capabilities(ctx)
	if err != nil || strings.Join(hgclient.Accepted(hs.Redirect, "http", "https"), ",") != "local-gcs" {
		t.Fatalf("a draining target must stay advertised: %+v %v", hs.Redirect, err)
	}
	for i := range 3 {
		res, err := c.Command(ctx, "manifestdata", args(fmt.Sprint("f", i), 100000), rr)
		if err != nil || res.Redirected {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	// Its sole copy is still served, byte for byte.
	res, err := c.Command(ctx, "manifestdata", args("k", 100000), rr)
	if err != nil || !res.Redirected || !bytes.Equal(res.Objects, stored.Objects) {
		t.Fatalf("the draining target's only copy is not served: redirected=%v %v", res != nil && res.Redirected, err)
	}
	if n := outcomes(t, s, "inline_fill"); n != 1 {
		t.Fatalf("%v fills started, want only the one before the drain", n)
	}
	if n := objectCount(t, s); n != 1 {
		t.Fatalf("%d objects stored, want only the one before the drain", n)
	}
	if _, err := s.Admin.SetTargetState(ctx, &pb.SetTargetStateRequest{Name: "local-gcs", State: pb.TargetState_TARGET_STATE_DISABLED}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the disabled target leaves the advertisement", func() bool {
		hs, err := c.Capabilities(ctx)
		return err == nil && hs.Redirect == nil
	})
	if res, err := c.Command(ctx, "manifestdata", args("k", 100000), rr); err != nil || res.Redirected || !bytes.Equal(res.Objects, stored.Objects) {
		t.Fatalf("a disabled target still serves: %v", err)
	}
}

func TestCapabilitiesAdvertiseExactlyTheLiveTargets(t *testing.T) {
	s, c := startStack(t)
	ctx := context.Background()
	names := func() string {
		hs, err := c.Capabilities(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Join(hgclient.Accepted(hs.Redirect, "http", "https"), ",")
	}
	if got := names(); got != "local-gcs" {
		t.Fatalf("advertised %q", got)
	}
	mirror := s.Target()
	mirror.Name, mirror.Heartbeat, mirror.Region = "mirror", true, "elsewhere"
	if _, err := s.Admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: mirror}); err != nil {
		t.Fatal(err)
	}
	second := s.Target()
	second.Name, second.Weight = "second", 5
	if _, err := s.Admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: second}); err != nil {
		t.Fatal(err)
	}
	// The mirror has not heartbeated: not live. Same-region targets first, heavier first.
	eventually(t, 5*time.Second, "second advertised", func() bool { return names() == "second,local-gcs" })
	mirrorConn, err := s.Dial(s.PKI.Mirror)
	if err != nil {
		t.Fatal(err)
	}
	defer mirrorConn.Close()
	place := pb.NewPlacementServiceClient(mirrorConn)
	if _, err := place.Heartbeat(ctx, &pb.HeartbeatRequest{Target: "mirror", Ttl: durationpb.New(30 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "mirror advertised after its heartbeat", func() bool { return names() == "second,local-gcs,mirror" })
	if _, err := s.Admin.SetTargetState(ctx, &pb.SetTargetStateRequest{Name: "second", State: pb.TargetState_TARGET_STATE_DISABLED}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "disabled target withdrawn", func() bool { return names() == "local-gcs,mirror" })

	// The v2 capabilities command carries the same section, and the rest of the origin's map.
	res, err := c.Command(ctx, "capabilities", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	section, err := wire.ReadRedirect(res.Objects)
	if err != nil || len(section.Targets) != 2 || section.Targets[0].Name != "local-gcs" {
		t.Fatalf("capabilities command section: %+v %v", section, err)
	}
	var caps map[string]any
	if err := wire.Unmarshal(res.Objects, &caps); err != nil || caps["commands"] == nil || caps["rawrepoformats"] == nil {
		t.Fatalf("capabilities command lost the origin's entries: %v", err)
	}
}

func TestMalformedFramesGetProtocolErrorAndServingContinues(t *testing.T) {
	s, c := startStack(t)
	ctx := context.Background()
	url := s.AgentURL + "api/" + wire.APIVersion + "/ro/manifestdata"
	for _, body := range [][]byte{
		{0x01, 0x02},                                  // short header
		{0xff, 0xff, 0xff, 1, 0, 1, 1, 0x11},          // length past the limit
		{0x03, 0, 0, 1, 0, 2, 1, 0x11, 0xa1, 0x41, 1}, // server stream parity
		{0x02, 0, 0, 1, 0, 1, 1, 0x11, 0xa1, 0xff},    // bad CBOR
	} {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
		req.Header.Set("Content-Type", wire.MediaTypeFraming)
		req.Header.Set("Accept", wire.MediaTypeFraming)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, rerr := wire.ReadResponse(resp.Body, 1, wire.ReaderOptions{})
		resp.Body.Close()
		if rerr == nil || !strings.Contains(rerr.Error(), "protocol") {
			t.Fatalf("body %x: got %v, want a protocol error response", body, rerr)
		}
	}
	if _, err := c.Command(ctx, "manifestdata", args("g", 1000), redirectReq(t, c)); err != nil {
		t.Fatalf("agent stopped serving after malformed requests: %v", err)
	}
}

func TestStoreDownStillAnswersInlineAndRedirectsNothing(t *testing.T) {
	s, c := startStack(t)
	ctx := context.Background()
	rr := redirectReq(t, c)
	// A store that stops answering holds a fill until its claim ends; make that 5s.
	pol, err := s.Admin.GetPolicy(ctx, &pb.GetPolicyRequest{})
	if err != nil {
		t.Fatal(err)
	}
	pol.Policy.FillClaimTtl = durationpb.New(5 * time.Second)
	if _, err := s.Admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: pol.Policy}); err != nil {
		t.Fatal(err)
	}
	// Reads wait for the replica's own writes: once this answers, Place sees the policy too.
	if p, err := s.Admin.GetPolicy(ctx, &pb.GetPolicyRequest{}); err != nil || p.Policy.FillClaimTtl.AsDuration() != 5*time.Second {
		t.Fatalf("policy not applied: %v %v", p, err)
	}
	s.GCS.Stop()
	for i := range 3 {
		res, err := c.Command(ctx, "manifestdata", args("h", 150000), rr)
		if err != nil {
			t.Fatalf("request %d with the store down: %v", i, err)
		}
		if res.Redirected || len(res.Objects) < 150000 {
			t.Fatalf("request %d: redirected=%v, %d bytes", i, res.Redirected, len(res.Objects))
		}
	}
	// The failed fills end as failed uploads, never as reports: nothing becomes READY.
	eventually(t, 20*time.Second, "failed fills counted", func() bool {
		return agentCount(t, s, "detour_agent_fills_total", "outcome", "aborted", "upload_failed", "report_failed") > 0
	})
	list, err := s.Admin.ListObjects(ctx, &pb.ListObjectsRequest{})
	if err != nil || len(list.Objects) != 0 {
		t.Fatalf("objects READY although the store is down: %v %v", list, err)
	}
}

// agentCount sums the agent's counter metric over the series whose label has one of values.
func agentCount(t *testing.T, s *devstack.Stack, metric, label string, values ...string) float64 {
	t.Helper()
	var n float64
	for _, v := range values {
		n += testbed.MetricSum(t, s.Agent.Metrics().Registry, metric, testbed.Label(label, v))
	}
	return n
}

// outcomes counts the agent's requests that ended in one of the given outcomes. Unlike the
// store's object count, it is final when the response is: a fill starts only on inline_fill.
func outcomes(t *testing.T, s *devstack.Stack, values ...string) float64 {
	return agentCount(t, s, "detour_agent_requests_total", "outcome", values...)
}
