package agent

// Origin access control (DESIGN invariant 9).
//
// A redirect is answered without the origin, so without a check a repository the origin protects
// would hand its content to anyone who can reach the agent. Before a request is placed, the agent
// asks the origin whether it would serve this client, with a cheap request that carries the
// client's credentials and nothing else: the AccessProbe, which the front for this kind of origin
// supplies (for Mercurial's hgweb, internal/front/hgweb).
//
// The answer is cached per (credentials, repository) for a short TTL, under a salted SHA-256 of
// the credential headers: raw credentials are never kept. Concurrent checks for the same key
// collapse into one. Only an allowed answer allows; a refusal or an error means the request goes
// to the origin as it is, so the client gets the origin's own 401 and can authenticate. What a
// check cannot see, and so cannot preserve: access decided on the client's address or TLS client
// certificate (the origin sees the agent either way).

import (
	"container/list"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/logonce"
)

// AccessProbe asks the origin, within ctx, whether it would serve the repository at repo ("" for
// the origin's root) to a client that carries the credential headers creds (and no other
// header). An error means the origin could not be asked or answered something else; its answer
// is then AccessError.
type AccessProbe func(ctx context.Context, repo string, creds http.Header) (AccessAnswer, error)

// AccessAnswer is what the origin said about one client and repository.
type AccessAnswer int

const (
	AccessError   AccessAnswer = iota // the origin could not be asked, or answered something else
	AccessAllowed                     // the origin would serve the client
	AccessDenied                      // the origin refuses the client
)

const (
	accessError   = AccessError
	accessAllowed = AccessAllowed
	accessDenied  = AccessDenied
)

func (a AccessAnswer) String() string {
	switch a {
	case AccessAllowed:
		return "allowed"
	case AccessDenied:
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

// access checks clients' access with the origin's probe and caches the answers.
type access struct {
	probe   AccessProbe
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

func newAccess(bg context.Context, cfg *Config, m *Metrics, once *logonce.Set) *access {
	o := &access{probe: cfg.Access, ttl: cfg.OriginAuthTTL, timeout: cfg.OriginAuthTimeout, bg: bg, m: m, once: once, now: time.Now}
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
func (o *access) credentialsOf(r *http.Request, repo string) clientCreds {
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
func (o *access) anonymous(repo string) clientCreds {
	return o.credentialsOf(&http.Request{Header: http.Header{}}, repo)
}

// answer returns the origin's answer for c: from the cache, from a check already in flight for
// the same key, or from a new check. Errors are not cached: the next request asks again.
func (o *access) answer(c clientCreds) AccessAnswer {
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
		if ans != accessError {
			o.cache.put(c.key, ans, o.now().Add(o.ttl))
		}
		return ans, nil
	})
	ans := v.(AccessAnswer)
	if asked {
		o.m.originChecks.WithLabelValues(ans.String()).Inc()
	} else {
		o.m.originHits.WithLabelValues(ans.String()).Inc()
	}
	return ans
}

// ask sends one check to the origin.
func (o *access) ask(c clientCreds) AccessAnswer {
	ctx, cancel := context.WithTimeout(o.bg, o.timeout)
	defer cancel()
	ans, err := o.probe(ctx, c.repo, c.header.Clone())
	if err != nil {
		o.once.Warn("origin-check", "cannot check clients' access with the origin; their requests go to the origin as they are", "err", err)
		return accessError
	}
	o.once.Recovered("origin-check", "origin access checks answered again")
	return ans
}

// authorize says whether the origin would serve r's client the repository repo, and whether the
// repository refuses anonymous clients: a redirect of such a request to a target whose URLs
// anyone can fetch hands private content to whoever holds the URL, which the control plane
// records against the target. That second question is asked only while such targets are
// advertised (one anonymous check per repository and TTL).
func (a *Agent) authorize(r *http.Request, repo string) (ans AccessAnswer, private bool) {
	if a.access == nil {
		return accessAllowed, false
	}
	c := a.access.credentialsOf(r, repo)
	ans = a.access.answer(c)
	if c.anonymous {
		a.noteAnonymous(ans)
		return ans, false
	}
	if ans != accessAllowed || len(a.publicTargets()) == 0 {
		return ans, false
	}
	anon := a.access.answer(a.access.anonymous(repo))
	a.noteAnonymous(anon)
	return ans, anon == accessDenied
}

// noteAnonymous remembers the origin's latest answer to an anonymous client and, when it refused,
// warns about every advertised target whose URLs anyone can fetch.
func (a *Agent) noteAnonymous(ans AccessAnswer) {
	switch ans {
	case accessAllowed:
		a.anonDenied.Store(false)
	case accessDenied:
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
func (a *Agent) setPublicTargets(ts *TargetSet) {
	var public []string
	for _, t := range ts.Live {
		if _, signed := t.GetUrlForm().GetForm().(*pb.UrlForm_Signed); !signed {
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
	ans     AccessAnswer
	expires time.Time
}

func (c *authCache) init(max int) {
	c.max, c.ll, c.items = max, list.New(), map[[sha256.Size]byte]*list.Element{}
}

func (c *authCache) get(k [sha256.Size]byte, now time.Time) (AccessAnswer, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.items[k]
	if !ok {
		return accessError, false
	}
	ent := e.Value.(*authEntry)
	if !now.Before(ent.expires) {
		c.ll.Remove(e)
		delete(c.items, k)
		return accessError, false
	}
	c.ll.MoveToFront(e)
	return ent.ans, true
}

func (c *authCache) put(k [sha256.Size]byte, ans AccessAnswer, expires time.Time) {
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
