package agent

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Location is where a redirected client fetches a response: a READY object the control plane
// verified. It is immutable once made, so a front may keep its own encoding of it (Memo).
type Location struct {
	Target    string
	URL       string
	MediaType string
	Size      uint64
	SHA256    []byte
	SHA1      []byte
	// Generation and CRC32C are the store's, of the object the control plane verified (0: not
	// told); location checks compare them with what the URL serves.
	Generation int64
	CRC32C     uint32
	memo       atomic.Pointer[any]
}

func locationOf(resp *pb.PlaceResponse) *Location {
	l := resp.Location
	return &Location{Target: resp.Target, URL: l.Url, MediaType: l.MediaType, Size: l.Size, SHA256: l.Sha256, SHA1: l.Sha1,
		Generation: l.Generation, CRC32C: l.Crc32C}
}

// Memo returns what a front stored with SetMemo (nil if nothing): a location answered from the
// cache is the same *Location every time, so a front can keep its answer already encoded.
func (l *Location) Memo() any {
	if p := l.memo.Load(); p != nil {
		return *p
	}
	return nil
}

// SetMemo keeps v with the location.
func (l *Location) SetMemo(v any) { l.memo.Store(&v) }

// locationCache keeps the redirects the control plane allows agents to reuse (cache_for on a
// Place answer), so that a hot key is answered without a Place round trip. A READY object is
// immutable; what ends a redirect's validity (the record removed or replaced, a target's state,
// health, URL form or store changed) reaches the agent on its WatchTargets stream, and the cache
// applies it: an invalidation drops the key, a new target set drops everything, and a broken
// stream stops the cache until the stream resumes (keeping what it holds, with the invalidations
// it missed) or a target set arrives (dropping everything). Entries also end at
// the control plane's cache_for and the agent's own maximum age, and the cache holds at most max
// entries (an arbitrary one is evicted to make room).
type locationCache struct {
	max    int
	maxAge time.Duration

	mu      sync.Mutex
	entries map[string]cached
	live    bool  // a stream is delivering invalidations
	horizon int64 // answers from snapshots before it may have missed an invalidation
	// recent is each key's latest invalidation revision, so that a Place answer from a snapshot
	// taken before an invalidation that has already arrived is not cached.
	recent map[string]int64
	m      *Metrics
}

type cached struct {
	loc   *Location
	until time.Time
}

// maxRecent bounds the recent-invalidation memory; past it, it is cleared and the horizon moves
// up to the stream's revision instead.
const maxRecent = 100000

func newLocationCache(max int, maxAge time.Duration, m *Metrics) *locationCache {
	return &locationCache{max: max, maxAge: maxAge, entries: map[string]cached{}, recent: map[string]int64{}, m: m}
}

func (c *locationCache) enabled() bool { return c != nil && c.max > 0 && c.maxAge > 0 }

// get returns the cached location for key if it is still valid and the client accepts its target.
func (c *locationCache) get(key string, accepted []string, now time.Time) (*Location, bool) {
	if !c.enabled() {
		return nil, false
	}
	c.mu.Lock()
	e, ok := c.entries[key]
	if !c.live {
		// The stream is down: an invalidation may be on its way. Entries wait for it to resume.
		ok = false
	} else if ok && !now.Before(e.until) {
		delete(c.entries, key)
		ok = false
	}
	c.mu.Unlock()
	if !ok || !slices.Contains(accepted, e.loc.Target) {
		c.m.cacheMisses.Inc()
		return nil, false
	}
	c.m.cacheHits.Inc()
	return e.loc, true
}

// put keeps a location the control plane allowed to be reused, unless an invalidation this agent
// already applied may postdate the snapshot it was decided on.
func (c *locationCache) put(key string, loc *Location, resp *pb.PlaceResponse, now time.Time) {
	if !c.enabled() || resp.CacheFor == nil {
		return
	}
	ttl := min(resp.CacheFor.AsDuration(), c.maxAge)
	if ttl <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.live || resp.SnapshotRevision < c.horizon || c.recent[key] > resp.SnapshotRevision {
		c.m.cache.WithLabelValues("refused").Inc()
		return
	}
	if _, there := c.entries[key]; !there && len(c.entries) >= c.max {
		for k := range c.entries {
			delete(c.entries, k)
			c.m.cache.WithLabelValues("evicted").Inc()
			break
		}
	}
	c.entries[key] = cached{loc: loc, until: now.Add(ttl)}
	c.m.cache.WithLabelValues("stored").Inc()
}

// apply takes one WatchTargets message.
func (c *locationCache) apply(msg *pb.WatchTargetsResponse) {
	if !c.enabled() {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case msg.Resumed:
		// The stream resumed where the last one ended: the target set is unchanged, and the
		// invalidations since come with this message. Entries stay.
		c.live = true
	case !msg.InvalidationsOnly || msg.Flush:
		// A target set may change any target's validity; a flush says the stream lost track.
		c.dropAll("flushed")
		c.live, c.horizon = true, msg.Revision
		clear(c.recent)
		return
	}
	for _, x := range msg.Invalidations {
		if _, there := c.entries[x.Key]; there {
			delete(c.entries, x.Key)
			c.m.cache.WithLabelValues("invalidated").Inc()
		}
		c.recent[x.Key] = max(c.recent[x.Key], x.Revision)
	}
	if len(c.recent) > maxRecent {
		clear(c.recent)
		c.horizon = msg.Revision
	}
}

// lost stops answering from the cache: without the stream, invalidations would be missed. The
// entries are kept for a stream that resumes (their own expiry still ends them); one that does not
// resume starts with a target set, which drops them.
func (c *locationCache) lost() {
	if !c.enabled() {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.live = false
}

func (c *locationCache) dropAll(why string) {
	if n := len(c.entries); n > 0 {
		c.m.cache.WithLabelValues(why).Add(float64(n))
	}
	clear(c.entries)
}

func (c *locationCache) len() int {
	if c == nil {
		return 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}
