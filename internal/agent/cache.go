package agent

import (
	"slices"
	"sync"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/wire"
)

// locationCache keeps the redirects the control plane allows agents to reuse (cache_for on a
// Place answer), so that a hot key is answered without a Place round trip. A READY object is
// immutable; what ends a redirect's validity (the record removed or replaced, a target's state,
// health, URL form or store changed) reaches the agent on its WatchTargets stream, and the cache
// applies it: an invalidation drops the key, a new target set drops everything, and a broken
// stream drops everything and stops caching until a target set arrives again. Entries also end at
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
	target string
	loc    *pb.Location
	until  time.Time
	// answer is the redirect response already encoded for a client asking for hashes (the
	// digests a location carries depend on them); a client asking for others gets one encoded
	// for it.
	answer *wire.PreparedRedirect
	hashes []string
}

// maxRecent bounds the recent-invalidation memory; past it, it is cleared and the horizon moves
// up to the stream's revision instead.
const maxRecent = 100000

func newLocationCache(max int, maxAge time.Duration, m *Metrics) *locationCache {
	return &locationCache{max: max, maxAge: maxAge, entries: map[string]cached{}, recent: map[string]int64{}, m: m}
}

func (c *locationCache) enabled() bool { return c != nil && c.max > 0 && c.maxAge > 0 }

// get returns the cached redirect for key if it is still valid and the client accepts its target.
func (c *locationCache) get(key string, accepted []string, now time.Time) (cached, bool) {
	if !c.enabled() {
		return cached{}, false
	}
	c.mu.Lock()
	e, ok := c.entries[key]
	if ok && !now.Before(e.until) {
		delete(c.entries, key)
		ok = false
	}
	c.mu.Unlock()
	if !ok || !slices.Contains(accepted, e.target) {
		c.m.cacheMisses.Inc()
		return cached{}, false
	}
	c.m.cacheHits.Inc()
	return e, true
}

// put keeps a redirect the control plane allowed to be reused, unless an invalidation this agent
// already applied may postdate the snapshot it was decided on.
func (c *locationCache) put(key string, resp *pb.PlaceResponse, answer *wire.PreparedRedirect, hashes []string, now time.Time) {
	if !c.enabled() || resp.CacheFor == nil || resp.Location == nil {
		return
	}
	ttl := min(resp.CacheFor.AsDuration(), c.maxAge)
	if ttl <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.live || resp.SnapshotRevision < c.horizon || c.recent[key] > resp.SnapshotRevision {
		return
	}
	if _, there := c.entries[key]; !there && len(c.entries) >= c.max {
		for k := range c.entries {
			delete(c.entries, k)
			c.m.cache.WithLabelValues("evicted").Inc()
			break
		}
	}
	c.entries[key] = cached{target: resp.Target, loc: resp.Location, until: now.Add(ttl), answer: answer, hashes: hashes}
	c.m.cache.WithLabelValues("stored").Inc()
}

// apply takes one WatchTargets message.
func (c *locationCache) apply(msg *pb.WatchTargetsResponse) {
	if !c.enabled() {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !msg.InvalidationsOnly || msg.Flush {
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

// lost drops everything and stops caching: without the stream, invalidations would be missed.
func (c *locationCache) lost() {
	if !c.enabled() {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.live = false
	c.dropAll("flushed")
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
