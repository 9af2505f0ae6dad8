package blob

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/gcsemu"
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
	u := st.Create(ctx, "objects", "hg/abc", "application/mercurial-cbor")
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
	u2 := st.Create(ctx, "objects", "hg/abc", "application/mercurial-cbor")
	u2.Write([]byte("other"))
	if _, err := u2.Commit(); !errors.Is(err, ErrExists) {
		t.Fatalf("overwrite of an existing object: %v", err)
	}
	if h, err := st.Hash(ctx, "objects", "hg/abc"); err != nil || !bytes.Equal(h.SHA256, s256[:]) || h.Size != uint64(len(data)) {
		t.Fatalf("hash of the stored object: %v", err)
	}
	if n, err := st.Size(ctx, "objects", "hg/abc"); err != nil || n != int64(len(data)) {
		t.Fatalf("size %d, %v", n, err)
	}
	if _, err := st.Size(ctx, "objects", "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("size of missing: %v", err)
	}
}

func TestAbortLeavesNothing(t *testing.T) {
	emu, st := startGCS(t)
	u := st.Create(context.Background(), "objects", "gone", "application/mercurial-cbor")
	u.Write([]byte("partial"))
	u.Abort()
	if n, _ := emu.ObjectCount("objects"); n != 0 {
		t.Fatalf("%d objects after abort", n)
	}
}

func TestLocationURLs(t *testing.T) {
	emu, st := startGCS(t)
	ctx := context.Background()
	u := st.Create(ctx, "objects", "p/k1", "application/mercurial-cbor")
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

	pu, err := LocationURL(public, "p/k1", nil, now, time.Minute)
	if err != nil || pu != emu.PublicURL("objects")+"p/k1" {
		t.Fatalf("public url %q, %v", pu, err)
	}
	su, err := LocationURL(signed, "p/k1", signer, now, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	parsed, _ := url.Parse(su)
	q := parsed.Query()
	if q.Get("X-Goog-Algorithm") != "GOOG4-RSA-SHA256" || (q.Get("X-Goog-Expires") != "3600" && q.Get("X-Goog-Expires") != "3599") || q.Get("X-Goog-Signature") == "" ||
		!strings.HasPrefix(q.Get("X-Goog-Credential"), "detour@example.iam.gserviceaccount.com/") {
		t.Fatalf("signed url lacks V4 parameters: %s", su)
	}
	if _, err := LocationURL(signed, "p/k1", nil, now, time.Minute); !errors.Is(err, ErrNoSigner) {
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
