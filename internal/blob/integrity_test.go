package blob

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"cloud.google.com/go/pubsub/v2"
	"cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/storage"
	"google.golang.org/api/googleapi"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/gcsemu"
	"github.com/detourhq/detour/internal/testbed"
)

// rawClient is a storage client that is not Detour's: an operator's tool, a lifecycle rule.
func rawClient(t *testing.T, emu *gcsemu.Server) *storage.Client {
	t.Helper()
	c, err := storage.NewClient(context.Background(), option.WithEndpoint(emu.Endpoint()), option.WithoutAuthentication())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func commit(t *testing.T, st *Store, bucket, name string, data []byte) Result {
	t.Helper()
	u := st.Create(context.Background(), bucket, name, "application/mercurial-cbor", "k")
	u.Write(data)
	res, err := u.Commit()
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// overwrite replaces an object's bytes the way another tool would, without conditions.
func overwrite(c *storage.Client, bucket, name string, data []byte) error {
	w := c.Bucket(bucket).Object(name).NewWriter(context.Background())
	w.ContentType = "application/mercurial-cbor"
	w.Write(data)
	return w.Close()
}

func get(t *testing.T, u string) (int, []byte) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func forbidden(err error) bool {
	var g *googleapi.Error
	return errors.As(err, &g) && g.Code == http.StatusForbidden
}

// A committed object is held: the store refuses to replace or delete it (fake-gcs-server does not
// keep holds; gcsemu adds them as GCS has them, and the storage client reads them back). Detour's
// own Delete releases the hold and deletes; a server-side copy is held too.
func TestCommittedObjectsAreHeldUntilDetourDeletesThem(t *testing.T) {
	emu, st := startGCS(t)
	raw := rawClient(t, emu)
	ctx := context.Background()
	res := commit(t, st, "objects", "hg/held", []byte("verified bytes"))
	a, err := st.Stat(ctx, "objects", "hg/held")
	if err != nil || !a.TemporaryHold || a.Generation != res.Generation {
		t.Fatalf("after commit: %+v %v; want held at generation %d", a, err, res.Generation)
	}
	if err := overwrite(raw, "objects", "hg/held", []byte("other bytes, same..")); !forbidden(err) {
		t.Fatalf("overwrite of a held object: %v, want 403", err)
	}
	if err := raw.Bucket("objects").Object("hg/held").Delete(ctx); !forbidden(err) {
		t.Fatalf("delete of a held object: %v, want 403", err)
	}
	if got, _ := emu.Object("objects", "hg/held"); string(got) != "verified bytes" {
		t.Fatalf("held object now %q", got)
	}
	// An upload that must create the object is told it exists (412), held or not.
	u := st.Create(ctx, "objects", "hg/held", "application/mercurial-cbor", "k")
	u.Write([]byte("again"))
	if _, err := u.Commit(); !errors.Is(err, ErrExists) {
		t.Fatalf("create over a held object: %v, want ErrExists", err)
	}

	cp, err := st.Copy(ctx, "objects", "hg/held", res.Generation, "objects", "hg/copy")
	if err != nil || !cp.TemporaryHold {
		t.Fatalf("copy: %+v %v; want held", cp, err)
	}
	for _, c := range []struct {
		name string
		gen  int64
	}{{"hg/held", res.Generation}, {"hg/copy", 0}} {
		if err := st.Delete(ctx, "objects", c.name, c.gen); err != nil {
			t.Fatalf("Detour's delete of %s: %v", c.name, err)
		}
		if _, err := st.Stat(ctx, "objects", c.name); !errors.Is(err, ErrNotFound) {
			t.Fatalf("%s after delete: %v", c.name, err)
		}
	}
	// Released and deleted by hand, as an operator who means it would.
	commit(t, st, "objects", "hg/ops", []byte("x"))
	a, _ = st.Stat(ctx, "objects", "hg/ops")
	if r, err := st.Hold(ctx, "objects", "hg/ops", a.Generation, false); err != nil || r.TemporaryHold {
		t.Fatalf("release: %+v %v", r, err)
	}
	if err := raw.Bucket("objects").Object("hg/ops").Delete(ctx); err != nil {
		t.Fatalf("delete after release: %v", err)
	}
	if _, err := st.Hold(ctx, "objects", "hg/ops", a.Generation, true); !errors.Is(err, ErrNotFound) {
		t.Fatalf("hold of a deleted generation: %v", err)
	}
}

// Public and V4-signed URLs name the generation that was verified: after the object is replaced
// they answer 404, never the new bytes; a CDN base URL names the object only.
func TestLocationURLsPinTheVerifiedGeneration(t *testing.T) {
	emu, st := startGCS(t)
	raw := rawClient(t, emu)
	ctx := context.Background()
	res := commit(t, st, "objects", "p/k1", []byte("verified"))
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	signer := &Signer{GoogleAccessID: "detour@example.iam.gserviceaccount.com", Hostname: emu.Host(), Insecure: true,
		PrivateKey: pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})}
	store := &pb.GcsStore{Bucket: "objects", Prefix: "p/"}
	forms := map[string]*pb.UrlForm{
		"public": {Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: emu.PublicURL("objects")}},
		"signed": {Form: &pb.UrlForm_Signed{Signed: &pb.SignedUrls{Ttl: durationpb.New(time.Hour)}}},
		"cdn":    {Form: &pb.UrlForm_CdnBaseUrl{CdnBaseUrl: emu.PublicURL("objects")}},
	}
	urls := map[string]string{}
	for name, f := range forms {
		u, err := LocationURLAt(&pb.Target{Name: name, Store: store, UrlForm: f}, "objects", "p/k1", res.Generation, signer, time.Now(), time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		parsed, _ := url.Parse(u)
		if pinned := parsed.Query().Get("generation") == strconv.FormatInt(res.Generation, 10); pinned != (name != "cdn") {
			t.Fatalf("%s URL %s: pinned=%v", name, u, pinned)
		}
		if code, body := get(t, u); code != 200 || string(body) != "verified" {
			t.Fatalf("%s before the replacement: %d %q", name, code, body)
		}
		urls[name] = u
	}
	if _, err := st.Hold(ctx, "objects", "p/k1", res.Generation, false); err != nil {
		t.Fatal(err)
	}
	if err := overwrite(raw, "objects", "p/k1", []byte("replaced")); err != nil {
		t.Fatal(err)
	}
	for name, u := range urls {
		code, body := get(t, u)
		switch name {
		case "cdn":
			if code != 200 || string(body) != "replaced" {
				t.Fatalf("cdn after the replacement: %d %q (an unpinned URL serves what is there)", code, body)
			}
		default:
			if code != http.StatusNotFound {
				t.Fatalf("%s after the replacement: %d %q, want 404", name, code, body)
			}
		}
	}
}

// CheckLocation tells a same-size replacement from the intact object by the generation and CRC32C
// the store sends with it, a truncation by the size, a deletion by the status; a server that does
// not answer is an error, not a verdict.
func TestCheckLocationComparesGenerationAndCRC32C(t *testing.T) {
	emu, st := startGCS(t)
	raw := rawClient(t, emu)
	ctx := context.Background()
	data := []byte("0123456789abcdef")
	base := emu.PublicURL("objects")
	want := map[string]Expected{}
	for _, n := range []string{"intact", "same-size", "truncated", "deleted"} {
		r := commit(t, st, "objects", "c/"+n, data)
		want[n] = Expected{Size: r.Size, Generation: r.Generation, CRC32C: r.CRC32C, MediaType: "application/mercurial-cbor"}
		if n != "intact" {
			if _, err := st.Hold(ctx, "objects", "c/"+n, r.Generation, false); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := overwrite(raw, "objects", "c/same-size", []byte("FEDCBA9876543210")); err != nil {
		t.Fatal(err)
	}
	if err := overwrite(raw, "objects", "c/truncated", data[:8]); err != nil {
		t.Fatal(err)
	}
	if err := raw.Bucket("objects").Object("c/deleted").Delete(ctx); err != nil {
		t.Fatal(err)
	}
	cases := []struct{ name, says string }{
		{"intact", ""}, {"same-size", "generation"}, {"truncated", "size 8"}, {"deleted", "HTTP 404"},
	}
	for _, c := range cases {
		problem, err := CheckLocation(ctx, http.DefaultClient, base+"c/"+c.name, want[c.name])
		if err != nil || (c.says == "") != (problem == "") || !strings.Contains(problem, c.says) {
			t.Errorf("%s: problem %q, err %v; want one naming %q", c.name, problem, err, c.says)
		}
	}
	// A same-size replacement behind a server that keeps the generation header to itself is still
	// told by its CRC32C.
	strip := &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		resp, err := http.DefaultTransport.RoundTrip(r)
		if resp != nil {
			resp.Header.Del("X-Goog-Generation")
		}
		return resp, err
	})}
	if problem, err := CheckLocation(ctx, strip, base+"c/same-size", want["same-size"]); err != nil || !strings.Contains(problem, "crc32c") {
		t.Errorf("without the generation header: %q %v", problem, err)
	}
	lis := testbed.FreeAddr(t)
	if _, err := CheckLocation(ctx, http.DefaultClient, "http://"+lis+"/objects/c/intact", want["intact"]); err == nil {
		t.Error("an unreachable URL gave a verdict")
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// A bucket notification made with EnsureNotification (once: the second call finds it) reaches a
// Pub/Sub subscription through the real clients: the emulator publishes to the in-process Pub/Sub
// emulator, and an overwrite arrives as the deletion of the old generation and the finalization of
// the new one.
func TestBucketNotificationsReachPubSub(t *testing.T) {
	emu, st := startGCS(t)
	raw := rawClient(t, emu)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	addr, err := gcsemu.PubSub()
	if err != nil {
		t.Fatal(err)
	}
	ps, err := pubsub.NewClient(ctx, "blobtest", option.WithEndpoint(addr), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Close()
	topic, sub := "projects/blobtest/topics/"+t.Name(), "projects/blobtest/subscriptions/"+t.Name()
	if _, err := ps.TopicAdminClient.CreateTopic(ctx, &pubsubpb.Topic{Name: topic}); err != nil {
		t.Fatal(err)
	}
	if _, err := ps.SubscriptionAdminClient.CreateSubscription(ctx, &pubsubpb.Subscription{Name: sub, Topic: topic}); err != nil {
		t.Fatal(err)
	}
	for i, want := range []bool{true, false} {
		made, err := st.EnsureNotification(ctx, "objects", "n/", topic)
		if err != nil || made != want {
			t.Fatalf("EnsureNotification #%d: made %v, %v; want %v", i+1, made, err, want)
		}
	}
	if _, err := st.EnsureNotification(ctx, "objects", "n/", "topics/x"); err == nil || !strings.Contains(err.Error(), "projects/<project>/topics/<topic>") {
		t.Fatalf("a malformed topic: %v", err)
	}

	var mu sync.Mutex
	var got []Event
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- ps.Subscriber(sub).Receive(rctx, func(_ context.Context, m *pubsub.Message) {
			if e, ok := ParseEvent(m.Attributes); ok {
				mu.Lock()
				got = append(got, e)
				mu.Unlock()
			}
			m.Ack()
		})
	}()
	res := commit(t, st, "objects", "n/obj", []byte("first"))
	commit(t, st, "objects", "elsewhere/obj", []byte("not under the prefix"))
	if _, err := st.Hold(ctx, "objects", "n/obj", res.Generation, false); err != nil {
		t.Fatal(err)
	}
	if err := overwrite(raw, "objects", "n/obj", []byte("second")); err != nil {
		t.Fatal(err)
	}
	now, err := st.Stat(ctx, "objects", "n/obj")
	if err != nil {
		t.Fatal(err)
	}
	has := func(typ string, gen, by int64) bool {
		mu.Lock()
		defer mu.Unlock()
		for _, e := range got {
			if e.Type == typ && e.Bucket == "objects" && e.Name == "n/obj" && e.Generation == gen && e.OverwrittenBy == by {
				return true
			}
		}
		return false
	}
	// The replaced generation's deletion names the one written over it, as GCS's does.
	testbed.Eventually(t, 10*time.Second, "the overwrite's events", func() bool {
		return has(EventFinalize, res.Generation, 0) && has(EventDelete, res.Generation, now.Generation) && has(EventFinalize, now.Generation, 0)
	})
	stop()
	<-done
	mu.Lock()
	defer mu.Unlock()
	for _, e := range got {
		if !strings.HasPrefix(e.Name, "n/") {
			t.Fatalf("an event outside the prefix: %+v", e)
		}
	}
	if _, ok := ParseEvent(map[string]string{"eventType": "OBJECT_FINALIZE", "bucketId": "b"}); ok {
		t.Fatal("attributes without an object parsed as an event")
	}
}

// The emulator's filesystem backend keeps objects and their holds across a restart.
func TestEmulatorOnDiskKeepsObjectsAndHolds(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	start := func() (*gcsemu.Server, *Store) {
		emu, err := gcsemu.StartWith(gcsemu.Options{Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		emu.CreateBucket("objects")
		st, err := NewStore(ctx, Options{Endpoint: emu.Endpoint()})
		if err != nil {
			t.Fatal(err)
		}
		return emu, st
	}
	emu, st := start()
	res := commit(t, st, "objects", "d/k", bytes.Repeat([]byte("on disk "), 1000))
	a1, err := st.Stat(ctx, "objects", "d/k")
	if err != nil || !a1.TemporaryHold || a1.Generation != res.Generation {
		t.Fatalf("before the restart: %+v %v, committed generation %d", a1, err, res.Generation)
	}
	st.Close()
	emu.Stop()

	emu, st = start()
	defer emu.Stop()
	defer st.Close()
	a2, err := st.Stat(ctx, "objects", "d/k")
	if err != nil || a2.Generation != a1.Generation || a2.CRC32C != a1.CRC32C || !a2.TemporaryHold {
		t.Fatalf("after the restart: %+v %v, before %+v", a2, err, a1)
	}
	if err := st.Verify(ctx, Claim{Bucket: "objects", Name: "d/k", MediaType: "application/mercurial-cbor", Key: "k",
		Size: res.Size, SHA256: res.SHA256, SHA1: res.SHA1, CRC32C: res.CRC32C, Generation: res.Generation}, true); err != nil {
		t.Fatalf("the committed object does not verify after the restart: %v", err)
	}
	if err := overwrite(rawClient(t, emu), "objects", "d/k", []byte("x")); !forbidden(err) {
		t.Fatalf("overwrite after the restart: %v, want 403 (the hold survived)", err)
	}
	if err := st.Delete(ctx, "objects", "d/k", res.Generation); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Stat(ctx, "objects", "d/k"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after Detour's delete: %v", err)
	}
}
