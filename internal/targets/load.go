package targets

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// A load reads everything under the prefix at one revision. etcd's paginated Range counts every
// key left in the range for each page (etcd issues 11057 and 16510), which made a load by pages
// quadratic in the number of records; etcd 3.7's RangeStream reads a range in chunks that do not
// count, so a load costs the same per record whatever the size. A stream is served by one
// goroutine in etcd: the load reads four sub-ranges at once, at the revision of a count taken
// first. Against a server without RangeStream (an older etcd, the gRPC proxy), the load reads in
// pages within 256 sub-ranges, which bounds each page's count to a 256th of the records.
//
// Records are decoded on every core while the streams are received, into leaves sized from that
// count; each leaf is then sorted once.

// LoadProgress is how many object records the latest load (a full read under way, or the last
// one) has read so far, for progress reports while the first snapshot loads.
func (w *Watcher) LoadProgress() int64 { return w.progress.records.Load() }

// LoadExpected is how many object records etcd counted when the latest load began (0 until then):
// with LoadProgress, how far the load has come.
func (w *Watcher) LoadExpected() int64 { return w.progress.expected.Load() }

// LoadBegan is when the latest load began (zero before the first): rates are measured from it,
// since a load that failed and began again counts its records from zero.
func (w *Watcher) LoadBegan() time.Time {
	if ns := w.progress.began.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

type loadProgress struct {
	records, expected, began atomic.Int64
}

// load reads everything under the prefix at one revision and publishes it.
func (w *Watcher) load(ctx context.Context) (int64, error) {
	began := time.Now()
	w.progress.records.Store(0)
	w.progress.expected.Store(0)
	w.progress.began.Store(began.UnixNano())

	objPrefix := w.prefix + "objects/"
	// The count fixes the revision: everything is read at it.
	expected, rev, err := w.count(ctx, objPrefix)
	if err != nil {
		return 0, err
	}
	w.progress.expected.Store(expected)
	if rev, ok, err := w.tryCopy(ctx); ok || err != nil {
		return rev, err
	}
	snap := emptySnapshot()
	// The home records first: the decoders resolve the records that name one, whichever stream
	// brings them.
	homesPrefix := w.prefix + "homes/"
	err = w.readRange(ctx, homesPrefix, clientv3.GetPrefixRangeEnd(homesPrefix), rev, func(kvs []*mvccpb.KeyValue) {
		for _, kv := range kvs {
			w.apply(snap, nil, mvccpb.PUT, kv)
		}
	})
	if err != nil {
		return 0, err
	}
	l := newLoader(w, expected)
	l.shared = snap.homes
	chunks, decoded := decoders(l.add)
	// Everything but object and home records (targets, health, claims, agents, policy) is applied
	// here, one stream at a time; object records go to the decoders.
	var applyMu sync.Mutex
	err = w.read(ctx, rev, func(kvs []*mvccpb.KeyValue) {
		i := 0
		for _, kv := range kvs {
			if bytes.HasPrefix(kv.Key, []byte(objPrefix)) {
				kvs[i] = kv
				i++
				continue
			}
			if bytes.HasPrefix(kv.Key, []byte(homesPrefix)) {
				continue // read above, and shared with the decoders: not to be modified
			}
			applyMu.Lock()
			w.apply(snap, nil, mvccpb.PUT, kv)
			applyMu.Unlock()
		}
		if i > 0 {
			w.progress.records.Add(int64(i))
			chunks <- kvs[:i]
		}
	})
	close(chunks)
	decoded()
	if err != nil {
		return 0, err
	}
	w.publishLoad(snap, l, rev, began, "snapshot loaded")
	return rev, nil
}

// publishLoad completes a full read at rev, by range or from a copy: the index built from l, the
// snapshot published and logged with how the load went.
func (w *Watcher) publishLoad(snap *Snapshot, l *loader, rev int64, began time.Time, msg string, attrs ...any) {
	snap.objects = l.build()
	snap.Revision, snap.TargetsRevision, snap.applied = rev, rev, rev
	w.finish(snap)
	w.invalidations.reset(rev)
	w.publish(snap)
	took := time.Since(began)
	w.log.Info(msg, append([]any{"revision", rev, "targets", len(snap.targets), "objects", snap.objects.count,
		"claims", len(snap.claims), "took", took.Round(time.Millisecond).String(),
		"records_per_second", int64(float64(w.progress.records.Load()) / max(took.Seconds(), 1e-3))}, attrs...)...)
}

// decoders starts a decoder per core, each calling add with the chunks sent to it and a home cache
// of its own. Close the channel, then call wait.
func decoders[T any](add func(T, *homeCache)) (chunks chan T, wait func()) {
	chunks = make(chan T, 4)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Go(func() {
			cache := &homeCache{}
			for c := range chunks {
				add(c, cache)
			}
		})
	}
	return chunks, wg.Wait
}

// count is how many keys are under prefix now, and the revision now.
func (w *Watcher) count(ctx context.Context, prefix string) (int64, int64, error) {
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := w.cli.Get(rctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return 0, 0, fmt.Errorf("count %s: %w", prefix, err)
	}
	w.cp.clusterID.Store(resp.Header.ClusterId)
	return resp.Count, resp.Header.Revision, nil
}

// bounds cuts the prefix into n contiguous ranges, at even points of the object records' key
// space (objects/40, objects/80, … for n = 4), whatever else sorts between them.
func (w *Watcher) bounds(n int) []string {
	out := []string{w.prefix}
	for i := 1; i < n; i++ {
		out = append(out, fmt.Sprintf("%sobjects/%02x", w.prefix, i*256/n))
	}
	return append(out, clientv3.GetPrefixRangeEnd(w.prefix))
}

// LocalRange reads up to limit keys of [key, end) at revision rev from an etcd member in this
// process, as a serializable Range would answer; more says whether keys of the range are left.
type LocalRange func(ctx context.Context, key, end string, rev, limit int64) (kvs []*mvccpb.KeyValue, more bool, err error)

// ReadLocally makes loads read the snapshot through r, from the etcd member this process embeds,
// rather than over gRPC: the same records at the same revision without encoding, encrypting,
// decrypting and decoding each of them (at a million records, most of a load's CPU). Only a
// member that has applied everything the watcher's client sees may be read so (the single member
// of an embedded etcd): the revision is fixed by a linearizable count through the client first.
// Call before Run.
func (w *Watcher) ReadLocally(r LocalRange) { w.local = r }

// read calls fn with every key-value under the prefix at rev, from several goroutines.
func (w *Watcher) read(ctx context.Context, rev int64, fn func([]*mvccpb.KeyValue)) error {
	if w.local != nil {
		return w.readLocal(ctx, rev, fn)
	}
	if !w.noStream.Load() {
		err := w.readStreams(ctx, rev, fn)
		if status.Code(err) != codes.Unimplemented {
			return err
		}
		// Nothing was read: the server refused the stream before the first chunk.
		w.noStream.Store(true)
		w.log.Warn("etcd has no RangeStream (older than 3.7, or a gRPC proxy); reading the snapshot in pages")
	}
	return w.readPages(ctx, rev, fn)
}

// readLocal reads the prefix through w.local, over the same sub-ranges as the streams, at once.
func (w *Watcher) readLocal(ctx context.Context, rev int64, fn func([]*mvccpb.KeyValue)) error {
	g, gctx := errgroup.WithContext(ctx)
	b := w.bounds(w.streams)
	for i := range len(b) - 1 {
		g.Go(func() error {
			for key := b[i]; ; {
				if err := gctx.Err(); err != nil {
					return err
				}
				kvs, more, err := w.local(gctx, key, b[i+1], rev, w.localChunk)
				if err != nil {
					return fmt.Errorf("read %s at revision %d in process: %w", w.prefix, rev, err)
				}
				if len(kvs) > 0 {
					fn(kvs)
				}
				if !more || len(kvs) == 0 {
					return nil
				}
				key = string(kvs[len(kvs)-1].Key) + "\x00"
			}
		})
	}
	return g.Wait()
}

// readStreams reads the prefix in parallel RangeStreams over sub-ranges, all at rev: one stream
// is served by one goroutine in etcd, so a single stream would leave the other cores idle.
func (w *Watcher) readStreams(ctx context.Context, rev int64, fn func([]*mvccpb.KeyValue)) error {
	g, gctx := errgroup.WithContext(ctx)
	b := w.bounds(w.streams)
	for i := range len(b) - 1 {
		g.Go(func() error { return w.readStream(gctx, b[i], b[i+1], rev, fn) })
	}
	return g.Wait()
}

func (w *Watcher) readStream(ctx context.Context, from, to string, rev int64, fn func([]*mvccpb.KeyValue)) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch, err := w.cli.GetStream(sctx, from, clientv3.WithRange(to), clientv3.WithRev(rev))
	if err != nil {
		return fmt.Errorf("read %s at revision %d: %w", w.prefix, rev, err)
	}
	defer func() {
		for range ch { // the receiving goroutine ends once it has sent everything or failed
		}
	}()
	final := false
	for resp := range ch {
		if err := resp.Err(); err != nil {
			return fmt.Errorf("read %s at revision %d: %w", w.prefix, rev, err)
		}
		if len(resp.Kvs) > 0 {
			fn(resp.Kvs)
		}
		final = final || resp.Header != nil
	}
	if !final {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("read %s at revision %d: %w", w.prefix, rev, err)
		}
		return fmt.Errorf("read %s at revision %d: the stream ended without its final chunk", w.prefix, rev)
	}
	return nil
}

// readPages reads the prefix in pages at rev, in 256 ranges cut at objects/01 … objects/ff so that
// each holds about a 256th of the object records.
func (w *Watcher) readPages(ctx context.Context, rev int64, fn func([]*mvccpb.KeyValue)) error {
	b := w.bounds(256)
	for i := range len(b) - 1 {
		if err := w.readRange(ctx, b[i], b[i+1], rev, fn); err != nil {
			return err
		}
	}
	return nil
}

func (w *Watcher) readRange(ctx context.Context, key, end string, rev int64, fn func([]*mvccpb.KeyValue)) error {
	for {
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		resp, err := w.cli.Get(rctx, key, clientv3.WithRange(end), clientv3.WithLimit(w.pageSize), clientv3.WithRev(rev))
		cancel()
		if err != nil {
			return fmt.Errorf("read %s at revision %d: %w", w.prefix, rev, err)
		}
		if len(resp.Kvs) > 0 {
			fn(resp.Kvs)
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return nil
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// loader collects the copies of a load into their leaves.
type loader struct {
	w      *Watcher
	prefix []byte // of object records
	mu     [leafCount]sync.Mutex
	leaves [leafCount]shard
	// gone is set, by leaf, when records come from a copy of etcd's database (dbcopy.go): a key's
	// copy at a target may come several times, and gone holds the revisions that ended one.
	gone [][]goneCopy
	// shared are the home records of a ranged load, read before its object records.
	shared map[homeRef]*sharedHome
}

func newLoader(w *Watcher, expected int64) *loader {
	l := &loader{w: w, prefix: []byte(w.prefix + "objects/")}
	// Leaves fill evenly (shardOf folds the whole key): room for the expected share, so that most
	// leaves grow without copying while records come in; build copies each to its size.
	if per := int(expected / leafCount); per > 0 {
		per += per / 4
		for i := range l.leaves {
			l.leaves[i] = shard{keys: make([]Key, 0, per), objs: make([]Object, 0, per)}
		}
	}
	return l
}

// add decodes object records and files them into their leaves.
func (l *loader) add(kvs []*mvccpb.KeyValue, cache *homeCache) {
	cache.shared = l.shared
	for _, kv := range kvs {
		k, o, ok := l.w.decodeObject(kv.Key[len(l.prefix):], kv.Value, kv.ModRevision, cache)
		if !ok {
			continue
		}
		l.file(k, o)
	}
}

// file adds k's copy o to its leaf.
func (l *loader) file(k Key, o Object) {
	s := shardOf(k)
	l.mu[s].Lock()
	l.leaves[s].keys = append(l.leaves[s].keys, k)
	l.leaves[s].objs = append(l.leaves[s].objs, o)
	l.mu[s].Unlock()
}

// build sorts each leaf, on every core, and makes the index of them. etcd streams the records in
// key order, so each leaf is sorted but where decoders' chunks interleaved: an insertion sort
// costs little more than a pass.
func (l *loader) build() *index {
	ix := &index{}
	for n := range ix.nodes {
		ix.nodes[n] = &node{}
	}
	var next, count atomic.Int64
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				s := int(next.Add(1)) - 1
				if s >= leafCount {
					return
				}
				sh := l.leaves[s]
				l.leaves[s] = shard{}
				if len(sh.keys) == 0 {
					continue
				}
				if l.gone != nil {
					settleLeaf(&sh, l.gone[s])
					l.gone[s] = nil
				} else {
					sortLeaf(&sh)
				}
				// Every leaf is copied to its size, also one that the room made for it fits
				// nearly: the load's arrays then all die together, instead of some staying
				// scattered among the load's garbage in spans the collector cannot give back (43 MB
				// of heap in use at 1e6 records, bench/RESULTS.md).
				sh = shard{keys: slices.Clone(sh.keys), objs: slices.Clone(sh.objs)}
				ix.nodes[s/fanout].leaves[s%fanout] = &sh
				count.Add(int64(len(sh.keys)))
			}
		}()
	}
	wg.Wait()
	for n, nd := range ix.nodes {
		if *nd == (node{}) {
			ix.nodes[n] = nil
		}
	}
	ix.count = int(count.Load())
	return ix
}

// sortLeaf sorts a leaf by key, a key's copies by target (insertion sort: the leaf is nearly
// sorted).
func sortLeaf(s *shard) {
	less := func(i, j int) bool {
		if c := compareKeys(s.keys[i], s.keys[j]); c != 0 {
			return c < 0
		}
		return s.objs[i].Target() < s.objs[j].Target()
	}
	for i := 1; i < len(s.keys); i++ {
		for j := i; j > 0 && less(j, j-1); j-- {
			s.keys[j], s.keys[j-1] = s.keys[j-1], s.keys[j]
			s.objs[j], s.objs[j-1] = s.objs[j-1], s.objs[j]
		}
	}
}

// homeCache remembers the last homes one decoder interned, so that a record of a known home costs
// no allocation and no lock. shared are the home records that records may name (not modified
// while the cache is in use).
type homeCache struct {
	homes  [8]cachedHome
	next   int
	shared map[homeRef]*sharedHome
}

type cachedHome struct {
	h  *Home
	id homeID
}

func (c *homeCache) find(target []byte, r *record, prefix []byte) (homeID, bool) {
	for _, e := range c.homes {
		if h := e.h; h != nil && h.Target == string(target) && h.TargetUID == string(r.targetUID) && h.Bucket == string(r.bucket) &&
			h.Prefix == string(prefix) && h.MediaType == string(r.mediaType) {
			return e.id, true
		}
	}
	return 0, false
}

// findShared finds a home record's home at target (compared by value: a snapshot's home records
// are new pointers after every load).
func (c *homeCache) findShared(target []byte, sh *sharedHome) (homeID, bool) {
	for _, e := range c.homes {
		if h := e.h; h != nil && h.Target == string(target) && h.TargetUID == sh.targetUID && h.Bucket == sh.bucket &&
			h.Prefix == sh.prefix && h.MediaType == sh.mediaType {
			return e.id, true
		}
	}
	return 0, false
}

func (c *homeCache) intern(h Home) homeID {
	id := homes.intern(h)
	c.homes[c.next] = cachedHome{h: homes.get(id), id: id}
	c.next = (c.next + 1) % len(c.homes)
	return id
}

// decodeObject decodes a record for a load: ok when it is a copy to index.
func (w *Watcher) decodeObject(rest, value []byte, modRev int64, cache *homeCache) (Key, Object, bool) {
	k, o, st := w.parseObject(rest, value, modRev, cache)
	return k, o, st == objectReady
}

const (
	objectReady  = iota // a copy to index
	objectNot           // a record, but not a servable copy: it replaces any copy of key at target
	objectBadKey        // not a record at all
)

// parseObject decodes the record at objects/<rest>. It logs what it rejects.
func (w *Watcher) parseObject(rest, value []byte, modRev int64, cache *homeCache) (Key, Object, int) {
	i := bytes.IndexByte(rest, '/')
	var k Key
	if i < 0 || !parseKeyBytes(&k, rest[:i]) {
		w.log.Error("skipping object with a malformed key", "key", w.prefix+"objects/"+string(rest))
		return k, Object{}, objectBadKey
	}
	ks, target := rest[:i], rest[i+1:]
	var r record
	if err := r.decode(value); err != nil {
		w.log.Error("skipping undecodable object", "key", w.prefix+"objects/"+string(rest), "err", err)
		return k, Object{}, objectNot
	}
	if r.state != pb.ObjectState_OBJECT_STATE_READY {
		return k, Object{}, objectNot
	}
	var shared *sharedHome
	if r.hasRef {
		if shared = cache.shared[r.ref]; shared == nil {
			w.log.Error("skipping object record whose home is not stored", "key", w.prefix+"objects/"+string(rest),
				"home", r.ref.String())
			return k, Object{}, objectNot
		}
	}
	prefix, named := r.name, r.namePrefix
	if !named {
		prefix, named = bytes.CutSuffix(r.name, ks)
	}
	if !named || r.targetFromValue && !bytes.Equal(r.target, target) || len(r.sha256) != 32 || len(r.sha1) != 20 {
		// Every fill stores its object as prefix+key with both digests; anything else was not
		// written by a verified fill and is never served.
		w.log.Error("skipping object record that no verified fill wrote", "key", w.prefix+"objects/"+string(rest),
			"object_name", string(r.name))
		return k, Object{}, objectNot
	}
	var h homeID
	var ok bool
	if shared != nil {
		if h, ok = cache.findShared(target, shared); !ok {
			h = cache.intern(Home{Target: string(target), TargetUID: shared.targetUID, Bucket: shared.bucket,
				Prefix: shared.prefix, MediaType: shared.mediaType})
		}
	} else if h, ok = cache.find(target, &r, prefix); !ok {
		h = cache.intern(Home{Target: string(target), TargetUID: string(r.targetUID), Bucket: string(r.bucket),
			Prefix: string(prefix), MediaType: string(r.mediaType)})
	}
	o := Object{home: h, Size: r.size, Created: r.created, Expires: r.expires, ModRevision: modRev,
		Generation: r.generation, CRC32C: r.crc32c, Transient: r.transient}
	copy(o.SHA256[:], r.sha256)
	copy(o.SHA1[:], r.sha1)
	return k, o, objectReady
}

// parseKeyBytes parses 64 lower-case hex digits into k.
func parseKeyBytes(k *Key, s []byte) bool { return unhexInto(k[:], s) }

// unhexInto parses exactly 2·len(dst) lower-case hex digits into dst, without allocating.
func unhexInto(dst, s []byte) bool {
	if len(s) != 2*len(dst) {
		return false
	}
	for i := range dst {
		hi, ok1 := unhex(s[2*i])
		lo, ok2 := unhex(s[2*i+1])
		if !ok1 || !ok2 {
			return false
		}
		dst[i] = hi<<4 | lo
	}
	return true
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	}
	return 0, false
}
