package agent

import (
	"context"
	"crypto/sha256"
	"net/http"
	"net/url"
	"testing"
	"time"
)

func mustURL(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func allowAll(context.Context, string, http.Header) (AccessAnswer, error) { return AccessAllowed, nil }

// The cache holds at most its size, dropping the least recently used, and never answers past an
// entry's expiry.
func TestAuthCacheIsBoundedAndExpires(t *testing.T) {
	var c authCache
	c.init(3)
	now := time.Now()
	key := func(i int) [sha256.Size]byte { return sha256.Sum256([]byte{byte(i)}) }
	for i := range 3 {
		c.put(key(i), AccessAllowed, now.Add(time.Minute))
	}
	if _, ok := c.get(key(0), now); !ok { // 0 is now the most recently used
		t.Fatal("entry 0 missing")
	}
	c.put(key(3), AccessDenied, now.Add(time.Minute))
	if c.len() != 3 {
		t.Fatalf("%d entries, the bound is 3", c.len())
	}
	if _, ok := c.get(key(1), now); ok {
		t.Fatal("the least recently used entry (1) was kept over the bound")
	}
	for _, i := range []int{0, 2, 3} {
		if _, ok := c.get(key(i), now); !ok {
			t.Fatalf("entry %d dropped", i)
		}
	}
	if ans, ok := c.get(key(3), now.Add(time.Minute-time.Nanosecond)); !ok || ans != AccessDenied {
		t.Fatalf("entry 3 before its expiry: %v %v", ans, ok)
	}
	if _, ok := c.get(key(3), now.Add(time.Minute)); ok {
		t.Fatal("entry 3 answered at its expiry")
	}
	if c.len() != 2 {
		t.Fatalf("an expired entry stays: %d entries", c.len())
	}
}

// The cache key covers the repository and every value of every credential header, and nothing
// else; the credentials are not in it.
func TestCredentialDigests(t *testing.T) {
	cfg := Config{Origin: mustURL(t, "http://origin/"), Access: allowAll, OriginAuthHeaders: []string{"authorization", "Cookie"}}
	if err := cfg.setDefaults(); err != nil {
		t.Fatal(err)
	}
	o := newAccess(t.Context(), &cfg, newMetrics(), nil)
	req := func(h http.Header) *http.Request { return &http.Request{Header: h} }
	base := o.credentialsOf(req(http.Header{"Authorization": {"Basic YTpi"}, "User-Agent": {"hg/5.6.1"}}), "")
	if base.anonymous || base.header.Get("Authorization") != "Basic YTpi" || base.header.Get("User-Agent") != "" {
		t.Fatalf("credentials: %+v", base)
	}
	same := o.credentialsOf(req(http.Header{"Authorization": {"Basic YTpi"}, "User-Agent": {"curl"}}), "")
	if same.key != base.key {
		t.Fatal("a header that is not a credential changed the key")
	}
	for name, other := range map[string]clientCreds{
		"another password":       o.credentialsOf(req(http.Header{"Authorization": {"Basic YTpj"}}), ""),
		"another repository":     o.credentialsOf(req(http.Header{"Authorization": {"Basic YTpi"}}), "/r"),
		"a cookie too":           o.credentialsOf(req(http.Header{"Authorization": {"Basic YTpi"}, "Cookie": {"s=1"}}), ""),
		"anonymous":              o.anonymous(""),
		"value moved to another": o.credentialsOf(req(http.Header{"Cookie": {"Basic YTpi"}}), ""),
	} {
		if other.key == base.key {
			t.Errorf("%s has the same key", name)
		}
	}
	if !o.anonymous("").anonymous {
		t.Error("no credential headers is not anonymous")
	}
	other := newAccess(t.Context(), &cfg, newMetrics(), nil)
	if other.credentialsOf(req(http.Header{"Authorization": {"Basic YTpi"}}), "").key == base.key {
		t.Error("two agents' digests of the same credentials are equal: the digest is not salted")
	}
}

// BenchmarkOriginCheckWarm is what the check adds to a request whose answers are cached: the
// digest of its credentials, and two cache lookups (its own answer, and the anonymous one asked
// while a target with unsigned URLs is advertised).
func BenchmarkOriginCheckWarm(b *testing.B) {
	cfg := Config{Origin: mustURL(b, "http://origin/"), Access: allowAll}
	if err := cfg.setDefaults(); err != nil {
		b.Fatal(err)
	}
	o := newAccess(b.Context(), &cfg, newMetrics(), nil)
	r := &http.Request{Header: http.Header{"Authorization": {"Basic YWxpY2U6czNjcmV0"}, "User-Agent": {"mercurial/proto-1.0 (Mercurial 5.6.1)"},
		"Cookie": {"session=0123456789abcdef0123456789abcdef"}}}
	c, anon := o.credentialsOf(r, ""), o.anonymous("")
	o.cache.put(c.key, AccessAllowed, time.Now().Add(time.Hour))
	o.cache.put(anon.key, AccessDenied, time.Now().Add(time.Hour))
	b.ReportAllocs()
	for b.Loop() {
		if o.answer(o.credentialsOf(r, "")) != AccessAllowed || o.answer(o.anonymous("")) != AccessDenied {
			b.Fatal("cache miss")
		}
	}
}
