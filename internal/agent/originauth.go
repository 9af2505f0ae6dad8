package agent

// Origin access control (DESIGN invariant 9).
//
// A redirect is answered without the origin, so without a check a repository the origin protects
// (hgweb's allow-read or deny-read, HTTP authentication in a web server in front of it) would hand
// its content to anyone who can reach the agent. Before a cacheable request is placed, the agent
// asks the origin whether it would serve this client, with a cheap request that carries the
// client's credentials and nothing else: `GET <repository>?cmd=capabilities`. Mercurial's hgweb
// checks the `pull` permission for that command exactly as it does for a v2 `ro` command (both go
// through hgweb's permission hooks, checkauthz and those extensions add), and a web server that
// authenticates in front of hgweb protects that URL as it protects the rest of the repository.
// Without the v2 upgrade headers the origin answers the short v1 capabilities string, so a check
// costs the origin a permission check and a few hundred bytes.
//
// The answer is cached per (credentials, repository) for a short TTL, under a salted SHA-256 of
// the credential headers: raw credentials are never kept. Concurrent checks for the same key
// collapse into one. Only a 200 with a Mercurial media type allows; a refusal (3xx, 4xx) or an
// error means the request goes to the origin as it is, so the client gets the origin's own 401
// and can authenticate. What the check cannot see, and so cannot preserve: access decided on the
// client's address or TLS client certificate (the origin sees the agent either way).

import (
	"container/list"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/logonce"
	"github.com/detourhq/detour/internal/wire"
)

// authAnswer is what the origin said about one client and repository.
type authAnswer int

const (
	authError   authAnswer = iota // the origin could not be asked, or answered something else
	authAllowed                   // the origin would serve the client
	authDenied                    // the origin refuses the client
)

func (a authAnswer) String() string {
	switch a {
	case authAllowed:
		return "allowed"
	case authDenied:
		return "denied"
	}
	return "error"
}

// clientCreds are what one request authenticates with, for one repository.
type clientCreds struct {
	key       [sha256.Size]byte // salted digest of repo and the credential headers
	repo      string            // the repository's path, "" for the origin's root
	header    http.Header       // the credential headers, sent with the check and never stored
	anonymous bool              // no credential header at all
}

// originAuth checks clients' access with the origin and caches the answers.
type originAuth struct {
	origin  *url.URL
	client  *http.Client
	headers []string // canonical names
	ttl     time.Duration
	timeout time.Duration
	// salt makes the digests useless outside this process: a basic-auth header is a low-entropy
	// secret that an unsalted hash found in a memory dump would give away to a dictionary.
	salt    [32]byte
	bg      context.Context // checks run under it, not under one waiting client's request
	cache   authCache
	flights singleflight.Group
	m       *Metrics
	once    *logonce.Set
	now     func() time.Time
}

func newOriginAuth(bg context.Context, cfg *Config, m *Metrics, once *logonce.Set) *originAuth {
	o := &originAuth{origin: cfg.Origin, ttl: cfg.OriginAuthTTL, timeout: cfg.OriginAuthTimeout, bg: bg, m: m, once: once, now: time.Now,
		client: &http.Client{Transport: cfg.Transport,
			// A redirect is the origin's answer (a login page elsewhere, typically), not something
			// to follow: following it could read a 200 from a page that serves everyone.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
	}
	for _, h := range cfg.OriginAuthHeaders {
		if h = http.CanonicalHeaderKey(strings.TrimSpace(h)); h != "" && !slices.Contains(o.headers, h) {
			o.headers = append(o.headers, h)
		}
	}
	slices.Sort(o.headers)
	o.cache.init(cfg.OriginAuthCacheSize)
	_, _ = rand.Read(o.salt[:]) // crypto/rand.Read never fails (it panics rather)
	return o
}

// credentialsOf returns the credentials r carries for repo.
func (o *originAuth) credentialsOf(r *http.Request, repo string) clientCreds {
	c := clientCreds{repo: repo, header: http.Header{}, anonymous: true}
	h := sha256.New()
	h.Write(o.salt[:])
	field := func(s string) {
		// Length-prefixed, so that no two different header sets hash the same input.
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(s)))
		h.Write(n[:])
		h.Write([]byte(s))
	}
	field(repo)
	for _, name := range o.headers {
		vs := r.Header.Values(name)
		field(name)
		field(strconv.Itoa(len(vs)))
		for _, v := range vs {
			field(v)
			c.header.Add(name, v)
			c.anonymous = false
		}
	}
	h.Sum(c.key[:0])
	return c
}

// anonymous returns the credentials of a request that carries none, for repo.
func (o *originAuth) anonymous(repo string) clientCreds {
	return o.credentialsOf(&http.Request{Header: http.Header{}}, repo)
}

// answer returns the origin's answer for c: from the cache, from a check already in flight for
// the same key, or from a new check. Errors are not cached: the next request asks again.
func (o *originAuth) answer(c clientCreds) authAnswer {
	if ans, ok := o.cache.get(c.key, o.now()); ok {
		o.m.originHits.WithLabelValues(ans.String()).Inc()
		return ans
	}
	asked := false
	v, _, _ := o.flights.Do(string(c.key[:]), func() (any, error) {
		// A check that ended between the lookup above and this call has stored its answer.
		if ans, ok := o.cache.get(c.key, o.now()); ok {
			return ans, nil
		}
		asked = true
		ans := o.ask(c)
		if ans != authError {
			o.cache.put(c.key, ans, o.now().Add(o.ttl))
		}
		return ans, nil
	})
	ans := v.(authAnswer)
	if asked {
		o.m.originChecks.WithLabelValues(ans.String()).Inc()
	} else {
		o.m.originHits.WithLabelValues(ans.String()).Inc()
	}
	return ans
}

// maxCheckBody is how much of a check's answer is read so that its connection can be reused.
const maxCheckBody = 64 << 10

// ask sends one check to the origin.
func (o *originAuth) ask(c clientCreds) authAnswer {
	ans, err := classify(o.do(c))
	if err != nil {
		o.once.Warn("origin-check", "cannot check clients' access with the origin; their requests go to the origin as they are",
			"origin", o.origin.Redacted(), "err", err)
		return ans
	}
	o.once.Recovered("origin-check", "origin access checks answered again", "origin", o.origin.Redacted())
	return ans
}

func (o *originAuth) do(c clientCreds) (*http.Response, error) {
	ctx, cancel := context.WithTimeout(o.bg, o.timeout)
	defer cancel()
	u := *o.origin
	u.Path, u.RawPath, u.RawQuery = joinPath(u.Path, checkPath(c.repo)), "", "cmd=capabilities"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("origin access check: %w", err)
	}
	// Only the credentials: an answer that depended on any other header would not be the answer
	// for every request with these credentials.
	req.Header = c.header.Clone()
	req.Header.Set("User-Agent", "detour-agent (origin access check)")
	resp, err := o.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("origin access check %s: %w", u.Redacted(), err)
	}
	// Read (a bounded part of) the body before the context ends, so the connection is reused.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxCheckBody))
	resp.Body.Close()
	return resp, nil
}

// classify reads the origin's answer: only a Mercurial answer allows; 3xx and 4xx are the
// origin's refusal, except the ones that mean "not now" (408, 429), which are errors like 5xx.
func classify(resp *http.Response, err error) (authAnswer, error) {
	if err != nil {
		return authError, err
	}
	code, ct := resp.StatusCode, resp.Header.Get("Content-Type")
	switch {
	case code == http.StatusOK && strings.HasPrefix(ct, "application/mercurial-"):
		return authAllowed, nil
	case code == http.StatusRequestTimeout || code == http.StatusTooManyRequests:
	case code >= 300 && code < 500:
		return authDenied, nil
	}
	return authError, fmt.Errorf("origin access check: HTTP %d %q is not a Mercurial answer", code, ct)
}

// checkPath is the URL path of a repository's capabilities, where hgweb answers `?cmd=`.
func checkPath(repo string) string {
	if repo == "" {
		return "/"
	}
	return repo
}

// authorize says whether the origin would serve r's client the repository repo, and whether the
// repository refuses anonymous clients: a redirect of such a request to a target whose URLs
// anyone can fetch hands private content to whoever holds the URL, which the control plane
// records against the target. That second question is asked only while such targets are
// advertised (one anonymous check per repository and TTL).
func (a *Agent) authorize(r *http.Request, repo string) (ans authAnswer, private bool) {
	if a.auth == nil {
		return authAllowed, false
	}
	c := a.auth.credentialsOf(r, repo)
	ans = a.auth.answer(c)
	if c.anonymous {
		a.noteAnonymous(ans)
		return ans, false
	}
	if ans != authAllowed || len(a.publicTargets()) == 0 {
		return ans, false
	}
	anon := a.auth.answer(a.auth.anonymous(repo))
	a.noteAnonymous(anon)
	return ans, anon == authDenied
}

// noteAnonymous remembers the origin's latest answer to an anonymous client and, when it refused,
// warns about every advertised target whose URLs anyone can fetch.
func (a *Agent) noteAnonymous(ans authAnswer) {
	switch ans {
	case authAllowed:
		a.anonDenied.Store(false)
	case authDenied:
		a.anonDenied.Store(true)
		a.warnPublicTargets()
	}
}

// warnPublicTargets logs once per target that private content is redirected to URLs that anyone
// can fetch, while the origin refuses anonymous clients.
func (a *Agent) warnPublicTargets() {
	if !a.anonDenied.Load() {
		return
	}
	for _, t := range a.publicTargets() {
		a.once.Warn("public-target:"+t, "the origin requires credentials but this target's URLs are not signed: "+
			"anyone who obtains a location URL can fetch private content; give the target signed URLs (detourctl targets update --signed-ttl)",
			"target", t, "origin", a.cfg.Origin.Redacted())
	}
}

func (a *Agent) publicTargets() []string {
	if p := a.public.Load(); p != nil {
		return *p
	}
	return nil
}

// setPublicTargets records which advertised targets hand out URLs that anyone can fetch (public
// or CDN base URLs, not signed ones), and warns about new ones if the origin is private.
func (a *Agent) setPublicTargets(msg *pb.WatchTargetsResponse, section *wire.RedirectSection) {
	var public []string
	for _, t := range msg.Targets {
		_, signed := t.GetUrlForm().GetForm().(*pb.UrlForm_Signed)
		advertised := slices.ContainsFunc(section.Targets, func(rt wire.RedirectTarget) bool { return rt.Name == t.Name })
		if advertised && !signed {
			public = append(public, t.Name)
		}
	}
	for _, old := range a.publicTargets() {
		if !slices.Contains(public, old) {
			a.once.Forget("public-target:" + old) // warn again if it comes back unsigned
		}
	}
	a.public.Store(&public)
	a.warnPublicTargets()
}

// authCache is a bounded LRU of answers with an expiry.
type authCache struct {
	mu    sync.Mutex
	max   int
	ll    *list.List // front: most recently used
	items map[[sha256.Size]byte]*list.Element
}

type authEntry struct {
	key     [sha256.Size]byte
	ans     authAnswer
	expires time.Time
}

func (c *authCache) init(max int) {
	c.max, c.ll, c.items = max, list.New(), map[[sha256.Size]byte]*list.Element{}
}

func (c *authCache) get(k [sha256.Size]byte, now time.Time) (authAnswer, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.items[k]
	if !ok {
		return authError, false
	}
	ent := e.Value.(*authEntry)
	if !now.Before(ent.expires) {
		c.ll.Remove(e)
		delete(c.items, k)
		return authError, false
	}
	c.ll.MoveToFront(e)
	return ent.ans, true
}

func (c *authCache) put(k [sha256.Size]byte, ans authAnswer, expires time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.items[k]; ok {
		ent := e.Value.(*authEntry)
		ent.ans, ent.expires = ans, expires
		c.ll.MoveToFront(e)
		return
	}
	c.items[k] = c.ll.PushFront(&authEntry{key: k, ans: ans, expires: expires})
	for c.ll.Len() > c.max {
		old := c.ll.Back()
		c.ll.Remove(old)
		delete(c.items, old.Value.(*authEntry).key)
	}
}

func (c *authCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ll.Len()
}
