package hgv2_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/hgclient"
	"github.com/detourhq/detour/internal/wire"
)

// places is how many Place calls the control plane has answered.
func places(t *testing.T, s *devstack.Stack) float64 {
	return cpCount(t, s, "detour_place_decisions_total", nil)
}

// warm fills node's response and waits until the agent answers it from its cache (no Place).
func warm(t *testing.T, s *devstack.Stack, c *hgclient.Client, rr *wire.RedirectRequest, node string) {
	t.Helper()
	ctx := context.Background()
	if _, err := c.Command(ctx, "manifestdata", args(node, 100000), rr); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "a redirect answered from the agent's cache", func() bool {
		before := places(t, s)
		res, err := c.Command(ctx, "manifestdata", args(node, 100000), rr)
		if err != nil {
			t.Fatal(err)
		}
		return res.Redirected && places(t, s) == before
	})
}

// cachedNow reports whether the agent answers node from its cache now: a redirect without a Place.
func cachedNow(t *testing.T, s *devstack.Stack, c *hgclient.Client, rr *wire.RedirectRequest, node string) bool {
	t.Helper()
	before := places(t, s)
	res, err := c.Command(context.Background(), "manifestdata", args(node, 100000), rr)
	if err != nil {
		// A redirect the client could not follow (the target failing): still answered, from
		// the cache if no Place was made.
		if !strings.Contains(err.Error(), "HTTP 403") {
			t.Fatal(err)
		}
		return places(t, s) == before
	}
	return res.Redirected && places(t, s) == before
}

// A hot key is answered from the agent's cache, byte-identical, without a Place per request.
func TestHotKeysAreAnsweredWithoutPlace(t *testing.T) {
	s, c := startStack(t)
	rr := redirectReq(t, c)
	warm(t, s, c, rr, "h")
	before := places(t, s)
	first, err := c.Command(context.Background(), "manifestdata", args("h", 100000), nil)
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		res, err := c.Command(context.Background(), "manifestdata", args("h", 100000), rr)
		if err != nil || !res.Redirected || string(res.Objects) != string(first.Objects) {
			t.Fatalf("cached redirect: redirected=%v err=%v", res != nil && res.Redirected, err)
		}
	}
	if n := places(t, s) - before; n != 0 {
		t.Fatalf("%v Place calls for 20 requests of a cached key", n)
	}
	// A client that does not accept the cached redirect's target is not given it.
	other := &wire.RedirectRequest{Targets: []string{"elsewhere"}, Hashes: rr.Hashes}
	if res, err := c.Command(context.Background(), "manifestdata", args("h", 100000), other); err != nil || res.Redirected {
		t.Fatalf("a client that does not accept the target: redirected=%v err=%v", res != nil && res.Redirected, err)
	}
}

// Every change that ends a redirect's validity reaches the agent's cache: purge, a target drained,
// disabled, unhealthy or deleted, its URL form or store changed, the stream lost.
func TestEveryInvalidationEndsCachedRedirects(t *testing.T) {
	ctx := context.Background()
	type change struct {
		name  string
		apply func(t *testing.T, s *devstack.Stack)
	}
	setState := func(state pb.TargetState) func(t *testing.T, s *devstack.Stack) {
		return func(t *testing.T, s *devstack.Stack) {
			if _, err := s.Admin.SetTargetState(ctx, &pb.SetTargetStateRequest{Name: "local-gcs", State: state}); err != nil {
				t.Fatal(err)
			}
		}
	}
	update := func(edit func(*pb.Target)) func(t *testing.T, s *devstack.Stack) {
		return func(t *testing.T, s *devstack.Stack) {
			got, err := s.Admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "local-gcs"})
			if err != nil {
				t.Fatal(err)
			}
			edit(got.Target)
			if _, err := s.Admin.UpdateTarget(ctx, &pb.UpdateTargetRequest{Target: got.Target}); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, ch := range []change{
		{"purge", func(t *testing.T, s *devstack.Stack) {
			list, err := s.Admin.ListObjects(ctx, &pb.ListObjectsRequest{})
			if err != nil || len(list.Objects) == 0 {
				t.Fatalf("objects: %v %v", list, err)
			}
			for _, o := range list.Objects {
				if _, err := s.Admin.DeleteObjects(ctx, &pb.DeleteObjectsRequest{Key: o.Key}); err != nil {
					t.Fatal(err)
				}
			}
		}},
		{"drained", setState(pb.TargetState_TARGET_STATE_DRAINING)},
		{"disabled", setState(pb.TargetState_TARGET_STATE_DISABLED)},
		{"unhealthy", func(t *testing.T, s *devstack.Stack) { s.Front.Fail(403) }},
		{"deleted", func(t *testing.T, s *devstack.Stack) {
			if _, err := s.Admin.DeleteTarget(ctx, &pb.DeleteTargetRequest{Name: "local-gcs"}); err != nil {
				t.Fatal(err)
			}
		}},
		{"url form changed", update(func(tg *pb.Target) {
			tg.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: strings.Replace(tg.UrlForm.GetPublicBaseUrl(), "127.0.0.1", "localhost", 1)}}
			tg.Uris = []string{tg.UrlForm.GetPublicBaseUrl()}
		})},
		{"store moved", update(func(tg *pb.Target) { tg.Store.Bucket = "detour-elsewhere" })},
		{"stream lost", func(t *testing.T, s *devstack.Stack) {
			sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			s.CP.Shutdown(sctx)
		}},
	} {
		t.Run(ch.name, func(t *testing.T) {
			s, c := startStackFront(t)
			rr := redirectReq(t, c)
			warm(t, s, c, rr, "i")
			ch.apply(t, s)
			// The change reaches the agent within one watch round trip (the unhealthy verdict first
			// needs the prober's failures).
			within := 2 * time.Second
			if ch.name == "unhealthy" {
				within = 15 * time.Second
			}
			start := time.Now()
			eventually(t, within, "the cached redirect ended", func() bool {
				return !cachedNow(t, s, c, rr, "i")
			})
			t.Logf("%s: cached redirect ended %s after the change", ch.name, time.Since(start).Round(time.Millisecond))
		})
	}
}

// The control plane lets no redirect be cached past the object's expiry as it stood when it
// answered (use may extend the object; the agent then asks again).
func TestCachedRedirectsEndAtTheObjectsExpiry(t *testing.T) {
	s, c := startStack(t)
	ctx := context.Background()
	pol, err := s.Admin.GetPolicy(ctx, &pb.GetPolicyRequest{})
	if err != nil {
		t.Fatal(err)
	}
	pol.Policy.ObjectTtl = durationpb.New(3 * time.Second)
	if _, err := s.Admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: pol.Policy}); err != nil {
		t.Fatal(err)
	}
	if p, err := s.Admin.GetPolicy(ctx, &pb.GetPolicyRequest{}); err != nil || p.Policy.ObjectTtl.AsDuration() != 3*time.Second {
		t.Fatalf("policy: %v %v", p, err)
	}
	rr := redirectReq(t, c)
	warm(t, s, c, rr, "x")
	time.Sleep(3500 * time.Millisecond)
	if cachedNow(t, s, c, rr, "x") {
		t.Fatal("a redirect to an expired object was answered from the cache")
	}
}

func startStackFront(t *testing.T) (*devstack.Stack, *hgclient.Client) {
	t.Helper()
	s, err := devstack.Start(context.Background(), devstack.Options{DataDir: t.TempDir(), ObjectSize: 200 << 10,
		PlaceTimeout: placeTimeout, Log: quiet, FaultFront: true})
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
