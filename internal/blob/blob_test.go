package blob

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/gcsemu"
	"github.com/detourhq/detour/internal/testbed"
)

func startGCS(t *testing.T) (*gcsemu.Server, *Store) {
	t.Helper()
	emu, err := gcsemu.Start(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emu.Stop)
	emu.CreateBucket("objects")
	st, err := NewStore(context.Background(), Options{Endpoint: emu.Endpoint()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return emu, st
}

func TestUploadHashesAndCommits(t *testing.T) {
	emu, st := startGCS(t)
	ctx := context.Background()
	data := bytes.Repeat([]byte("detour!"), 1<<20) // 7 MiB: more than one chunk
	u := st.Create(ctx, "objects", "hg/abc", "application/mercurial-cbor", "k")
	for p := data; len(p) > 0; {
		n := min(len(p), 32768)
		if _, err := u.Write(p[:n]); err != nil {
			t.Fatal(err)
		}
		p = p[n:]
	}
	res, err := u.Commit()
	if err != nil {
		t.Fatal(err)
	}
	s256, s1 := sha256.Sum256(data), sha1.Sum(data)
	if res.Size != uint64(len(data)) || !bytes.Equal(res.SHA256, s256[:]) || !bytes.Equal(res.SHA1, s1[:]) {
		t.Fatalf("result %d bytes, hashes wrong", res.Size)
	}
	got, err := emu.Object("objects", "hg/abc")
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("stored object differs: %v", err)
	}
	// A second fill of the same name does not replace it.
	u2 := st.Create(ctx, "objects", "hg/abc", "application/mercurial-cbor", "k")
	u2.Write([]byte("other"))
	if _, err := u2.Commit(); !errors.Is(err, ErrExists) {
		t.Fatalf("overwrite of an existing object: %v", err)
	}
	if h, err := st.Hash(ctx, "objects", "hg/abc"); err != nil || !bytes.Equal(h.SHA256, s256[:]) || h.Size != uint64(len(data)) {
		t.Fatalf("hash of the stored object: %v", err)
	}
	a, err := st.Stat(ctx, "objects", "hg/abc")
	if err != nil || a.Size != uint64(len(data)) || a.CRC32C != res.CRC32C || a.Generation != res.Generation ||
		a.Metadata[MetaSHA256] != hex.EncodeToString(s256[:]) || a.Metadata[MetaSHA1] != hex.EncodeToString(s1[:]) {
		t.Fatalf("stat %+v, %v (upload %+v)", a, err, res)
	}
	if _, err := st.Stat(ctx, "objects", "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("stat of missing: %v", err)
	}
}

func TestAbortLeavesNothing(t *testing.T) {
	emu, st := startGCS(t)
	u := st.Create(context.Background(), "objects", "gone", "application/mercurial-cbor", "k")
	u.Write([]byte("partial"))
	u.Abort()
	// Usually nothing is there at once; bytes the store committed after the client gave up are
	// found by the second look.
	testbed.Eventually(t, 5*time.Second, "no object after abort", func() bool {
		n, _ := emu.ObjectCount("objects")
		return n == 0
	})
}

// An upload that the store committed although the client saw no answer is found by its token and
// deleted by Abort; an object another upload wrote, or one whose hashes a Commit recorded, is not.
func TestAbortDeletesOnlyItsOwnUncommittedBytes(t *testing.T) {
	_, st := startGCS(t)
	ctx := context.Background()
	// An upload that has not streamed anything (a streaming one would hold the emulator's object).
	u := &Upload{store: st, ctx: ctx, bucket: "objects", name: "late", token: uploadToken()}
	if u.deleteOwn() {
		t.Fatal("found an object before any was stored")
	}
	put := func(meta map[string]string) {
		t.Helper()
		if err := st.Delete(ctx, "objects", "late", 0); err != nil {
			t.Fatal(err)
		}
		w := st.client.Bucket("objects").Object("late").NewWriter(ctx)
		w.Metadata = meta
		w.Write([]byte("committed behind the client's back"))
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	put(map[string]string{MetaKey: "k", MetaUpload: "another upload"})
	if u.deleteOwn() {
		t.Fatal("deleted another upload's object")
	}
	put(map[string]string{MetaKey: "k", MetaUpload: u.token, MetaSHA256: "ab"})
	if u.deleteOwn() {
		t.Fatal("deleted an object whose hashes a commit recorded")
	}
	put(map[string]string{MetaKey: "k", MetaUpload: u.token})
	if !u.deleteOwn() {
		t.Fatal("did not find its own uncommitted object")
	}
	if _, err := st.Stat(ctx, "objects", "late"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("its own object is still there: %v", err)
	}
}

func TestLocationURLs(t *testing.T) {
	emu, st := startGCS(t)
	ctx := context.Background()
	u := st.Create(ctx, "objects", "p/k1", "application/mercurial-cbor", "k")
	u.Write([]byte("payload"))
	if _, err := u.Commit(); err != nil {
		t.Fatal(err)
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pemKey := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	signer := &Signer{GoogleAccessID: "detour@example.iam.gserviceaccount.com", PrivateKey: pemKey, Hostname: emu.Host(), Insecure: true}
	now := time.Now()
	store := &pb.GcsStore{Bucket: "objects", Prefix: "p/"}
	public := &pb.Target{Name: "pub", Store: store, UrlForm: &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: emu.PublicURL("objects")}}}
	signed := &pb.Target{Name: "sig", Store: store, UrlForm: &pb.UrlForm{Form: &pb.UrlForm_Signed{Signed: &pb.SignedUrls{Ttl: durationpb.New(time.Hour)}}}}

	pu, err := LocationURL(public, "objects", "p/k1", nil, now, time.Minute)
	if err != nil || pu != emu.PublicURL("objects")+"p/k1" {
		t.Fatalf("public url %q, %v", pu, err)
	}
	su, err := LocationURL(signed, "objects", "p/k1", signer, now, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	parsed, _ := url.Parse(su)
	q := parsed.Query()
	if q.Get("X-Goog-Algorithm") != "GOOG4-RSA-SHA256" || (q.Get("X-Goog-Expires") != "3600" && q.Get("X-Goog-Expires") != "3599") || q.Get("X-Goog-Signature") == "" ||
		!strings.HasPrefix(q.Get("X-Goog-Credential"), "detour@example.iam.gserviceaccount.com/") {
		t.Fatalf("signed url lacks V4 parameters: %s", su)
	}
	if _, err := LocationURL(signed, "objects", "p/k1", nil, now, time.Minute); !errors.Is(err, ErrNoSigner) {
		t.Fatalf("signed without a signer: %v", err)
	}
	for _, loc := range []string{pu, su} {
		resp, err := http.Get(loc)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "payload" {
			t.Fatalf("GET %s: %d %q", loc, resp.StatusCode, body)
		}
	}
}

func TestVerifyNamesWhatDiffers(t *testing.T) {
	_, st := startGCS(t)
	ctx := context.Background()
	data := []byte("the response's CBOR objects")
	u := st.Create(ctx, "objects", "p/key1", "application/mercurial-cbor", "key1")
	u.Write(data)
	res, err := u.Commit()
	if err != nil {
		t.Fatal(err)
	}
	good := Claim{Bucket: "objects", Name: "p/key1", MediaType: "application/mercurial-cbor", Key: "key1",
		Size: res.Size, SHA256: res.SHA256, SHA1: res.SHA1, CRC32C: res.CRC32C, Generation: res.Generation}
	for _, full := range []bool{false, true} {
		if err := st.Verify(ctx, good, full); err != nil {
			t.Fatalf("verify (full=%v) of a true report: %v", full, err)
		}
	}
	other := sha256.Sum256([]byte("other"))
	cases := map[string]func(c *Claim){
		"generation":   func(c *Claim) { c.Generation++ },
		"size":         func(c *Claim) { c.Size++ },
		"crc32c":       func(c *Claim) { c.CRC32C ^= 1 },
		"content type": func(c *Claim) { c.MediaType = "text/plain" },
		"key":          func(c *Claim) { c.Key = "key2" },
		"sha256":       func(c *Claim) { c.SHA256 = other[:] },
		"sha1":         func(c *Claim) { c.SHA1 = other[:20] },
	}
	for name, mutate := range cases {
		c := good
		mutate(&c)
		if err := st.Verify(ctx, c, false); !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), name) {
			t.Errorf("forged %s: err = %v", name, err)
		}
	}
	missing := good
	missing.Name = "p/never-uploaded"
	if err := st.Verify(ctx, missing, false); !errors.Is(err, ErrNotFound) {
		t.Errorf("never uploaded: err = %v", err)
	}
}

func TestDeleteIsIdempotentAndGenerationBound(t *testing.T) {
	emu, st := startGCS(t)
	ctx := context.Background()
	if err := st.Put(ctx, "objects", "p/a", "application/octet-stream", []byte("one")); err != nil {
		t.Fatal(err)
	}
	a, err := st.Stat(ctx, "objects", "p/a")
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Delete(ctx, "objects", "p/a", a.Generation+12345); err != nil {
		t.Fatalf("delete of another generation: %v", err)
	}
	if n, _ := emu.ObjectCount("objects"); n != 1 {
		t.Fatalf("a delete for another generation removed the object")
	}
	for i := 0; i < 2; i++ {
		if err := st.Delete(ctx, "objects", "p/a", a.Generation); err != nil {
			t.Fatalf("delete #%d: %v", i, err)
		}
	}
	if n, _ := emu.ObjectCount("objects"); n != 0 {
		t.Fatalf("%d objects after delete", n)
	}
	var names []string
	st.Put(ctx, "objects", "p/b", "x", []byte("b"))
	st.Put(ctx, "objects", "q/c", "x", []byte("c"))
	if err := st.List(ctx, "objects", "p/", func(l Listed) bool { names = append(names, l.Name); return true }); err != nil {
		t.Fatal(err)
	}
	if strings.Join(names, ",") != "p/b" {
		t.Fatalf("listing p/: %v", names)
	}
}

// A server-side copy keeps the bytes, content type and recorded hashes of the generation it names,
// and a copy of a generation that is no longer there fails.
func TestCopyIsServerSideAndGenerationBound(t *testing.T) {
	emu, st := startGCS(t)
	emu.CreateBucket("other")
	ctx := context.Background()
	data := bytes.Repeat([]byte("copy me "), 100000)
	u := st.Create(ctx, "objects", "hg/src", "application/mercurial-cbor", "the-key")
	u.Write(data)
	res, err := u.Commit()
	if err != nil {
		t.Fatal(err)
	}
	a, err := st.Copy(ctx, "objects", "hg/src", res.Generation, "other", "eu/src")
	if err != nil {
		t.Fatal(err)
	}
	if a.Size != res.Size || a.CRC32C != res.CRC32C || a.ContentType != "application/mercurial-cbor" || a.Generation == 0 ||
		a.Metadata[MetaKey] != "the-key" || a.Metadata[MetaSHA256] != hex.EncodeToString(res.SHA256) || a.Metadata[MetaSHA1] != hex.EncodeToString(res.SHA1) {
		t.Fatalf("copy attrs %+v, source %+v", a, res)
	}
	if got, err := emu.Object("other", "eu/src"); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("copied bytes differ: %v", err)
	}
	stat, err := st.Stat(ctx, "other", "eu/src")
	if err != nil || stat.Generation != a.Generation || stat.CRC32C != a.CRC32C || !stat.TemporaryHold {
		t.Fatalf("stat of the copy %+v %v, copy said %+v (held like a fill)", stat, err, a)
	}
	// The source replaced by other bytes (its hold released first): its old generation is gone,
	// and so is the copy's source.
	if _, err := st.Hold(ctx, "objects", "hg/src", res.Generation, false); err != nil {
		t.Fatal(err)
	}
	if err := st.Put(ctx, "objects", "hg/src", "application/mercurial-cbor", []byte("other bytes")); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Copy(ctx, "objects", "hg/src", res.Generation, "other", "eu/again"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("copy of a replaced generation: %v", err)
	}
	if _, err := st.Copy(ctx, "objects", "hg/missing", 1, "other", "eu/missing"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("copy of a missing object: %v", err)
	}
}

// pagedFront is a proxy to emu whose object listings answer two objects a page (a store may
// answer fewer than the client asks for) and whose later pages answer fault: an HTTP status, (0) a
// body cut short, (-2) a connection dropped mid-body, or (-1) what the emulator answers.
func pagedFront(t *testing.T, emu *gcsemu.Server, fault int) (endpoint string, pages *atomic.Int64) {
	t.Helper()
	up, _ := url.Parse("http://" + emu.Host())
	proxy := httputil.NewSingleHostReverseProxy(up)
	pages = new(atomic.Int64)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/o") {
			testbed.ServeProxy(w, r, proxy)
			return
		}
		pages.Add(1)
		q := r.URL.Query()
		if q.Get("pageToken") == "" || fault == -1 {
			q.Set("maxResults", "2")
			r.URL.RawQuery = q.Encode()
			proxy.ServeHTTP(w, r)
			return
		}
		if fault == 0 {
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"kind":"storage#objects","items":[{"name":"p/`)
			return
		}
		if fault == -2 {
			// The connection dropped mid-body: fewer bytes than the length announced.
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Content-Length", "100")
			io.WriteString(w, `{"kind":"storage#objects","items":[{"name":"p/`)
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(fault)
		fmt.Fprintf(w, `{"error":{"code":%d,"message":"page refused by the test"}}`, fault)
	}))
	t.Cleanup(srv.Close)
	return srv.URL + "/storage/v1/", pages
}

// A listing whose later page fails or cannot be read returns an error after the objects of the
// pages read, never nil as if the bucket held only those: a page refused outright, a page that
// keeps answering 503 (retried a few times, not for ever), a page whose body is cut short.
func TestListFailingMidWayIsAnError(t *testing.T) {
	t.Parallel()
	emu, st := startGCS(t)
	ctx := context.Background()
	for i := range 5 {
		if err := st.Put(ctx, "objects", fmt.Sprintf("p/%d", i), "x", []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		name  string
		fault int
		pages int64 // requests of the listing
	}{
		{"refused", http.StatusForbidden, 2},
		{"unavailable", http.StatusServiceUnavailable, 1 + 5},
		{"cut short", 0, 2},
		{"connection dropped mid-page", -2, 1 + 5}, // retried: nothing of the page was given to fn
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			ep, pages := pagedFront(t, emu, c.fault)
			front, err := NewStore(ctx, Options{Endpoint: ep})
			if err != nil {
				t.Fatal(err)
			}
			defer front.Close()
			var names []string
			err = front.List(ctx, "objects", "p/", func(l Listed) bool { names = append(names, l.Name); return true })
			if err == nil || !strings.Contains(err.Error(), "list objects/p/") {
				t.Fatalf("a listing cut short after %v: err %v", names, err)
			}
			if len(names) != 2 || pages.Load() != c.pages {
				t.Fatalf("%d objects listed in %d requests, want 2 in %d", len(names), pages.Load(), c.pages)
			}
			t.Logf("%v", err)
		})
	}
	// The same front failing nothing: every page read, nil.
	ep, pages := pagedFront(t, emu, -1)
	front, err := NewStore(ctx, Options{Endpoint: ep})
	if err != nil {
		t.Fatal(err)
	}
	defer front.Close()
	n := 0
	if err := front.List(ctx, "objects", "p/", func(Listed) bool { n++; return true }); err != nil || n != 5 || pages.Load() != 3 {
		t.Fatalf("the whole listing: %d objects in %d requests, %v; want 5 in 3", n, pages.Load(), err)
	}
}

// Listings ask the store only for the attributes List returns: on GCS every listed object is
// otherwise a whole resource (selfLink, mediaLink, md5Hash, etag, metadata …) to send and decode,
// and a control plane lists every record's object at each start. The emulator ignores the
// selection; the front here applies it as GCS does, keeping only the selected attributes of each
// item, and every field of Listed must still come through.
func TestListAsksOnlyForWhatItReturns(t *testing.T) {
	t.Parallel()
	emu, st := startGCS(t)
	ctx := context.Background()
	u := st.Create(ctx, "objects", "p/a", "application/mercurial-cbor", "a")
	if _, err := u.Write([]byte("some bytes")); err != nil {
		t.Fatal(err)
	}
	res, err := u.Commit()
	if err != nil {
		t.Fatal(err)
	}
	var asked atomic.Value
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		fields := q.Get("fields")
		if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/o") {
			asked.Store(fields)
		}
		q.Del("fields")
		resp, err := http.Get("http://" + emu.Host() + r.URL.Path + "?" + q.Encode())
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		var page map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&page); err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		var items []map[string]any
		if raw, ok := page["items"].([]any); ok {
			for _, it := range raw {
				items = append(items, it.(map[string]any))
			}
		}
		gcsemu.SelectListed(fields, items)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(page)
	}))
	t.Cleanup(srv.Close)
	front, err := NewStore(ctx, Options{Endpoint: srv.URL + "/storage/v1/"})
	if err != nil {
		t.Fatal(err)
	}
	defer front.Close()
	var got []Listed
	if err := front.List(ctx, "objects", "p/", func(l Listed) bool { got = append(got, l); return true }); err != nil {
		t.Fatal(err)
	}
	fields, _ := asked.Load().(string)
	if !strings.Contains(fields, "items(") || strings.Contains(fields, "mediaLink") {
		t.Fatalf("the listing asked for fields %q: want a selection of the items' attributes", fields)
	}
	if len(got) != 1 || got[0].Name != "p/a" || got[0].Size != 10 || got[0].Generation != res.Generation ||
		got[0].CRC32C != res.CRC32C || got[0].Created.IsZero() {
		t.Fatalf("listed %+v through a front applying %q; want p/a, 10 bytes, generation %d, CRC32C %d, a creation time",
			got, fields, res.Generation, res.CRC32C)
	}
}
