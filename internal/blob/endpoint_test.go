package blob

import (
	"context"
	"strings"
	"testing"

	"github.com/detourhq/detour/internal/gcsemu"
)

func TestNormalizeEndpoint(t *testing.T) {
	for _, c := range []struct{ in, want, err string }{
		{in: "", want: ""},
		{in: "127.0.0.1:4443", want: "http://127.0.0.1:4443/storage/v1/"},
		{in: "http://127.0.0.1:4443", want: "http://127.0.0.1:4443/storage/v1/"},
		{in: "http://127.0.0.1:4443/", want: "http://127.0.0.1:4443/storage/v1/"},
		{in: "https://gcs.internal/storage/v1", want: "https://gcs.internal/storage/v1/"},
		{in: "https://gcs.internal/storage/v1/", want: "https://gcs.internal/storage/v1/"},
		{in: "https://proxy.internal/gcs/storage/v1/", want: "https://proxy.internal/gcs/storage/v1/"},
		{in: "http://127.0.0.1:4443/bucket/", err: `path "/bucket/" does not end in /storage/v1/`},
		{in: "http://user:secret@127.0.0.1:4443/", err: "credentials"},
		{in: "http://127.0.0.1:4443/storage/v1/?alt=json", err: "query"},
		{in: "http://127.0.0.1:4443/storage/v1/#x", err: "fragment"},
		{in: "ftp://127.0.0.1/", err: "not http or https"},
		{in: "http:///storage/v1/", err: "no host"},
	} {
		got, err := NormalizeEndpoint(c.in)
		switch {
		case c.err == "" && (err != nil || got != c.want):
			t.Errorf("%q: got %q, %v; want %q", c.in, got, err, c.want)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("%q: got %q, %v; want an error with %q", c.in, got, err, c.err)
		case c.err != "" && strings.Contains(err.Error(), "secret"):
			t.Errorf("%q: the error repeats the password: %v", c.in, err)
		}
	}
}

// An endpoint given as host:port or as a URL without /storage/v1/ (what STORAGE_EMULATOR_HOST
// takes) fills and verifies like the full form: before, every fill uploaded its bytes and then
// failed verification with `recorded sha256 "" differs`.
func TestShortEndpointFormsFillAndVerify(t *testing.T) {
	emu, err := gcsemu.Start(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emu.Stop)
	emu.CreateBucket("objects")
	ctx := context.Background()
	for i, ep := range []string{emu.Host(), "http://" + emu.Host()} {
		st, err := NewStore(ctx, Options{Endpoint: ep})
		if err != nil {
			t.Fatal(err)
		}
		name := "p/key" + string(rune('a'+i))
		u := st.Create(ctx, "objects", name, "application/mercurial-cbor", "key")
		u.Write([]byte("the response"))
		res, err := u.Commit()
		if err != nil {
			t.Fatalf("%s: commit: %v", ep, err)
		}
		c := Claim{Bucket: "objects", Name: name, MediaType: "application/mercurial-cbor", Key: "key",
			Size: res.Size, SHA256: res.SHA256, SHA1: res.SHA1, CRC32C: res.CRC32C, Generation: res.Generation}
		if err := st.Verify(ctx, c, true); err != nil {
			t.Fatalf("%s: verify: %v", ep, err)
		}
		st.Close()
	}
	if _, err := NewStore(ctx, Options{Endpoint: "http://" + emu.Host() + "/objects/"}); err == nil {
		t.Fatal("a store with an endpoint the client cannot use was made")
	}
}
