package targets

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	etcdpb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// A load from a copy of etcd's database.
//
// A ranged read, streamed or in pages, visits the records in key order. etcd's database holds
// them in revision order and content keys are hashes, so every record read by key is a random
// lookup in etcd's B+tree: most of a large load's CPU, spent in etcd (59 % of a profile of a 3e6
// load). Maintenance.Snapshot instead sends the database file as it is, a sequential read for
// etcd. The watcher writes that copy beside its checkpoint, checks it against the SHA-256 etcd
// sends after it, opens it read-only and walks its key bucket in revision order: a key's last
// revision there is its value at the copy's revision (earlier ones are history not compacted yet,
// and a tombstone ends a key).
//
// The copy is the whole database, every prefix of a shared etcd included, so it is taken only
// when etcd's database is at most a configured size and the directory has room for it; etcd
// refuses it to a user without the root role when authentication is on. Any refusal falls back to
// the ranged read.

// dbCopies is a watcher's configuration of loads from database copies.
type dbCopies struct {
	dir      string // "" : never
	maxBytes int64
	// idle is how long the copy's stream may send nothing before the load gives up on it.
	idle time.Duration
	// refused is set once etcd refused a copy for good (no permission, not implemented).
	refused atomic.Bool
	// loaded and declined count loads from a copy and loads that read by range instead.
	loaded, declined atomic.Uint64
}

// DatabaseCopies reports how many loads read a copy of etcd's database, and how many were to but
// read by range instead (refused, too large, no room, damaged: logged each time).
func (w *Watcher) DatabaseCopies() (loaded, declined uint64) {
	return w.dbcopy.loaded.Load(), w.dbcopy.declined.Load()
}

// LoadFromDatabaseCopies makes loads read a copy of etcd's database, written in dir and removed
// once read, when etcd's database is at most maxBytes (0: at any size). Call before Run.
func (w *Watcher) LoadFromDatabaseCopies(dir string, maxBytes int64) {
	w.dbcopy.dir, w.dbcopy.maxBytes = dir, maxBytes
	if w.dbcopy.idle == 0 {
		w.dbcopy.idle = 30 * time.Second
	}
}

// copyFile is where the copy is written, in the configured directory.
func (w *Watcher) copyFile() string { return filepath.Join(w.dbcopy.dir, "etcd-db.copy") }

// errNoCopy is a copy that was not taken or could not be read: the load reads by range instead.
type errNoCopy struct {
	err   error
	final bool // etcd will refuse every copy: later loads do not ask
}

func (e errNoCopy) Error() string { return e.err.Error() }
func (e errNoCopy) Unwrap() error { return e.err }

// tryCopy loads from a copy when configured. ok is false when the load is to read by range: not
// configured, refused (logged), or the copy could not be used (logged).
func (w *Watcher) tryCopy(ctx context.Context) (int64, bool, error) {
	if w.dbcopy.dir == "" || w.dbcopy.refused.Load() {
		return 0, false, nil
	}
	rev, err := w.loadCopy(ctx)
	if err == nil {
		return rev, true, nil
	}
	if ctx.Err() != nil {
		return 0, false, err
	}
	w.dbcopy.declined.Add(1)
	var nc errNoCopy
	if errors.As(err, &nc) && nc.final {
		w.dbcopy.refused.Store(true)
		w.log.Warn("etcd refuses copies of its database; this and later loads read the records by range", "err", err)
	} else {
		w.log.Warn("no load from a copy of etcd's database; reading the records by range", "err", err)
	}
	w.progress.records.Store(0)
	return 0, false, nil
}

// loadCopy loads everything under the prefix from a copy of etcd's database and publishes it.
func (w *Watcher) loadCopy(ctx context.Context) (int64, error) {
	began := time.Now()
	path := w.copyFile()
	size, err := w.download(ctx, path)
	if err != nil {
		_ = os.Remove(path)
		return 0, err
	}
	downloaded := time.Since(began)
	snap, l, rev, err := w.walkFile(ctx, path, w.progress.expected.Load())
	if err != nil {
		return 0, err
	}
	w.dbcopy.loaded.Add(1) // before it is published: whoever sees the snapshot sees it counted
	w.publishLoad(snap, l, rev, began, "snapshot loaded from a copy of etcd's database", "copy_bytes", size,
		"copied_in", downloaded.Round(time.Millisecond).String())
	return rev, nil
}

// walkFile opens the copy of an etcd database at path read-only, removes it (the open file stays
// readable once unlinked: from here on, not even a crash leaves it behind) and walks it into a
// snapshot of everything but the object index, whose records are filed in l (l.build makes it).
// It returns the revision the copy holds everything up to. expected sizes the loader (0: unknown).
func (w *Watcher) walkFile(ctx context.Context, path string, expected int64) (*Snapshot, *loader, int64, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	_ = os.Remove(path)
	if err != nil {
		return nil, nil, 0, errNoCopy{err: fmt.Errorf("open the copy of etcd's database: %w", err)}
	}
	defer db.Close()
	snap := emptySnapshot()
	l := newLoader(w, expected)
	l.gone = make([][]goneCopy, leafCount)
	rev, err := w.walkCopy(ctx, db, snap, l)
	if err != nil {
		return nil, nil, 0, err
	}
	return snap, l, rev, nil
}

// download writes a copy of etcd's database to path and checks it against etcd's digest. It
// returns the copy's size.
func (w *Watcher) download(ctx context.Context, path string) (int64, error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// A stream that stalls is abandoned: the ranged read does not depend on it.
	idle := time.AfterFunc(w.dbcopy.idle, cancel)
	defer idle.Stop()
	stream, err := etcdpb.NewMaintenanceClient(w.cli.ActiveConnection()).Snapshot(sctx, &etcdpb.SnapshotRequest{})
	if err != nil {
		return 0, copyRefusal(err)
	}
	first, err := stream.Recv()
	if err != nil {
		if sctx.Err() != nil && ctx.Err() == nil {
			return 0, errNoCopy{err: fmt.Errorf("etcd sent no part of its database in %s", w.dbcopy.idle)}
		}
		return 0, copyRefusal(err)
	}
	total := int64(len(first.Blob)) + int64(first.RemainingBytes)
	if w.dbcopy.maxBytes > 0 && total > w.dbcopy.maxBytes {
		return 0, errNoCopy{err: fmt.Errorf("etcd's database is %d bytes, more than the %d a copy may take", total, w.dbcopy.maxBytes)}
	}
	_ = os.Remove(path) // a copy an earlier process left: it would count against the room
	if err := roomFor(filepath.Dir(path), total); err != nil {
		return 0, errNoCopy{err: err}
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, errNoCopy{err: fmt.Errorf("write the copy of etcd's database: %w", err)}
	}
	defer f.Close()
	h := sha256.New()
	var got int64
	var digest []byte
	for resp := first; ; {
		b := resp.Blob
		if n := min(int64(len(b)), total-got); n > 0 {
			if _, err := f.Write(b[:n]); err != nil {
				return 0, errNoCopy{err: fmt.Errorf("write the copy of etcd's database: %w", err)}
			}
			h.Write(b[:n])
			got += n
			b = b[n:]
		}
		digest = append(digest, b...)
		if len(digest) > sha256.Size {
			return 0, errNoCopy{err: fmt.Errorf("etcd sent %d bytes after its %d-byte database, not a digest", len(digest), total)}
		}
		idle.Reset(w.dbcopy.idle)
		if resp, err = stream.Recv(); err == io.EOF {
			break
		} else if err != nil {
			if sctx.Err() != nil && ctx.Err() == nil {
				return 0, errNoCopy{err: fmt.Errorf("etcd's copy of its database stalled for %s after %d of %d bytes", w.dbcopy.idle, got, total)}
			}
			return 0, fmt.Errorf("copy etcd's database: %w", err)
		}
	}
	switch {
	case got != total:
		return 0, errNoCopy{err: fmt.Errorf("etcd's copy of its database ended after %d of %d bytes", got, total)}
	case len(digest) != sha256.Size:
		return 0, errNoCopy{err: fmt.Errorf("etcd's copy of its database came without its SHA-256 (%d bytes after it)", len(digest))}
	case !bytes.Equal(digest, h.Sum(nil)):
		return 0, errNoCopy{err: errors.New("etcd's copy of its database does not match its SHA-256")}
	}
	if err := f.Close(); err != nil {
		return 0, errNoCopy{err: fmt.Errorf("write the copy of etcd's database: %w", err)}
	}
	return total, nil
}

// copyRefusal classifies etcd's refusal to send a copy: without permission (authentication on,
// a user without the root role) or without the service (a gRPC proxy), it will refuse every time.
func copyRefusal(err error) error {
	switch status.Code(err) {
	case codes.PermissionDenied, codes.Unimplemented, codes.Unauthenticated:
		return errNoCopy{err: fmt.Errorf("copy etcd's database: %w", err), final: true}
	}
	return fmt.Errorf("copy etcd's database: %w", err)
}

// roomFor checks that dir's file system has room for n bytes and a margin.
func roomFor(dir string, n int64) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("room for a copy of etcd's database in %s: %w", dir, err)
	}
	if free := int64(st.Bavail) * st.Bsize; free < n+n/8 {
		return fmt.Errorf("%s has %d bytes free, too few for a %d-byte copy of etcd's database", dir, free, n)
	}
	return nil
}

// etcd's database layout: the key bucket holds every revision of every key, keyed by revision
// (8 bytes of main revision, '_', 8 of sub revision, and 't' for a tombstone) with the KeyValue
// as value; the meta bucket holds, among others, the compaction revisions.
var (
	keyBucket       = []byte("key")
	metaBucket      = []byte("meta")
	compactionMarks = [][]byte{[]byte("scheduledCompactRev"), []byte("finishedCompactRev")}
)

// copyChunk is object records of a copy, with the home records they are decoded with.
type copyChunk struct {
	entries []copyEntry
	homes   map[homeRef]*sharedHome
}

// copyEntry is an object record's revision in a copy, its bytes in the copy's memory map.
type copyEntry struct {
	rest, value []byte // the etcd key after objects/, the record
	rev         int64
	tombstone   bool
}

// walkCopy reads the copy's key bucket in revision order: non-object keys are applied to snap
// here in order, object records are filed by decoders on every core into l. It returns the
// revision the copy holds everything up to.
func (w *Watcher) walkCopy(ctx context.Context, db *bolt.DB, snap *Snapshot, l *loader) (rev int64, err error) {
	defer func() {
		// bbolt panics on some damage it finds while reading; the digest was right, but a copy is
		// input like any other.
		if p := recover(); p != nil {
			err = errNoCopy{err: fmt.Errorf("the copy of etcd's database is damaged: %v", p)}
		}
	}()
	err = db.View(func(tx *bolt.Tx) error {
		keys := tx.Bucket(keyBucket)
		if keys == nil {
			return errNoCopy{err: errors.New("the copy of etcd's database has no key bucket")}
		}
		if meta := tx.Bucket(metaBucket); meta != nil {
			for _, name := range compactionMarks {
				if v := meta.Get(name); len(v) >= 8 {
					rev = max(rev, int64(binary.BigEndian.Uint64(v)))
				}
			}
		}
		chunks, decoded := decoders(l.addHistory)
		walked, err := w.walkKeys(ctx, keys, snap, chunks)
		close(chunks)
		decoded()
		rev = max(rev, walked)
		return err
	})
	return rev, err
}

// walkKeys walks the key bucket, sending object records to chunks; it returns the last revision.
func (w *Watcher) walkKeys(ctx context.Context, keys *bolt.Bucket, snap *Snapshot, chunks chan<- copyChunk) (int64, error) {
	prefix, objPrefix, homesPrefix := []byte(w.prefix), []byte(w.prefix+"objects/"), []byte(w.prefix+"homes/")
	const chunkLen = 1024
	chunk := make([]copyEntry, 0, chunkLen)
	var last int64
	c := keys.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		main, tombstone, ok := parseRevisionKey(k)
		if !ok || main < last {
			return 0, errNoCopy{err: fmt.Errorf("the copy of etcd's database has a malformed revision %x", k)}
		}
		last = main
		kv, ok := parseKeyValue(v)
		if !ok {
			return 0, errNoCopy{err: fmt.Errorf("the copy of etcd's database has a malformed record at revision %d", main)}
		}
		if !bytes.HasPrefix(kv.key, prefix) {
			continue
		}
		if bytes.HasPrefix(kv.key, objPrefix) {
			chunk = append(chunk, copyEntry{rest: kv.key[len(objPrefix):], value: kv.value, rev: main, tombstone: tombstone})
			if len(chunk) == chunkLen {
				if err := ctx.Err(); err != nil {
					return 0, err
				}
				w.progress.records.Add(int64(len(chunk)))
				chunks <- copyChunk{entries: chunk, homes: snap.homes}
				chunk = make([]copyEntry, 0, chunkLen)
			}
			continue
		}
		if bytes.HasPrefix(kv.key, homesPrefix) {
			// A chunk is decoded with the home records as they were when it was sent (a home is
			// written before every record that names it), so a change makes a new map.
			snap.homes = cloneMap(snap.homes)
		}
		// Targets, health, claims, agents and policy: few, applied in revision order, and copied
		// out of the memory map (apply may keep what it is given).
		typ := mvccpb.PUT
		if tombstone {
			typ = mvccpb.DELETE
		}
		w.apply(snap, nil, typ, &mvccpb.KeyValue{Key: bytes.Clone(kv.key), Value: bytes.Clone(kv.value), ModRevision: main,
			CreateRevision: kv.createRevision, Version: kv.version, Lease: kv.lease})
	}
	if len(chunk) > 0 {
		w.progress.records.Add(int64(len(chunk)))
		chunks <- copyChunk{entries: chunk, homes: snap.homes}
	}
	return last, nil
}

// parseRevisionKey parses a key of etcd's key bucket.
func parseRevisionKey(k []byte) (main int64, tombstone, ok bool) {
	switch {
	case len(k) == 17 && k[8] == '_':
	case len(k) == 18 && k[8] == '_' && k[17] == 't':
		tombstone = true
	default:
		return 0, false, false
	}
	main = int64(binary.BigEndian.Uint64(k))
	return main, tombstone, main > 0
}

// rawKeyValue is an mvccpb.KeyValue decoded without copying: key and value point into the copy.
type rawKeyValue struct {
	key, value                     []byte
	createRevision, version, lease int64
}

// parseKeyValue decodes an mvccpb.KeyValue.
func parseKeyValue(b []byte) (rawKeyValue, bool) {
	var kv rawKeyValue
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return kv, false
		}
		b = b[n:]
		switch {
		case (num == 1 || num == 5) && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return kv, false
			}
			if num == 1 {
				kv.key = v
			} else {
				kv.value = v
			}
			b = b[n:]
		case num >= 2 && num <= 6 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return kv, false
			}
			switch num {
			case 2:
				kv.createRevision = int64(v)
			case 4:
				kv.version = int64(v)
			case 6:
				kv.lease = int64(v)
			}
			b = b[n:]
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return kv, false
			}
			b = b[n:]
		}
	}
	return kv, len(kv.key) > 0
}

// goneCopy is a revision after which a key has no copy at a target: a tombstone, or a record
// that is not a servable copy.
type goneCopy struct {
	key    Key
	target string
	rev    int64
}

// addHistory files a copy's object records, revisions of one key possibly several times over.
func (l *loader) addHistory(c copyChunk, cache *homeCache) {
	cache.shared = c.homes
	for _, e := range c.entries {
		var k Key
		var o Object
		st := objectNot
		if e.tombstone {
			i := bytes.IndexByte(e.rest, '/')
			if i < 0 || !parseKeyBytes(&k, e.rest[:i]) {
				continue
			}
		} else {
			k, o, st = l.w.parseObject(e.rest, e.value, e.rev, cache)
		}
		switch st {
		case objectReady:
			l.file(k, o)
		case objectNot:
			target := string(e.rest[bytes.IndexByte(e.rest, '/')+1:])
			s := shardOf(k)
			l.mu[s].Lock()
			l.gone[s] = append(l.gone[s], goneCopy{key: k, target: target, rev: e.rev})
			l.mu[s].Unlock()
		}
	}
}

// settleLeaf sorts a leaf filed from history and keeps, of each key's copy at a target, its last
// revision, unless a later one ended it.
func settleLeaf(s *shard, gone []goneCopy) {
	sort.Sort(leafByRevision{s})
	out := 0
	for i := range s.keys {
		if i+1 < len(s.keys) && s.keys[i+1] == s.keys[i] && sameTarget(&s.objs[i+1], &s.objs[i]) {
			continue // a later revision of the same record follows
		}
		if endedAfter(gone, s.keys[i], s.objs[i].Target(), s.objs[i].ModRevision) {
			continue
		}
		s.keys[out], s.objs[out] = s.keys[i], s.objs[i]
		out++
	}
	s.keys, s.objs = s.keys[:out], s.objs[:out]
}

func sameTarget(a, b *Object) bool { return a.home == b.home || a.Target() == b.Target() }

func endedAfter(gone []goneCopy, k Key, target string, rev int64) bool {
	for _, g := range gone {
		if g.key == k && g.target == target && g.rev > rev {
			return true
		}
	}
	return false
}

// leafByRevision orders a leaf by key, then target, then revision.
type leafByRevision struct{ s *shard }

func (b leafByRevision) Len() int { return len(b.s.keys) }
func (b leafByRevision) Less(i, j int) bool {
	if c := compareKeys(b.s.keys[i], b.s.keys[j]); c != 0 {
		return c < 0
	}
	oi, oj := &b.s.objs[i], &b.s.objs[j]
	if !sameTarget(oi, oj) {
		return oi.Target() < oj.Target()
	}
	return oi.ModRevision < oj.ModRevision
}
func (b leafByRevision) Swap(i, j int) {
	b.s.keys[i], b.s.keys[j] = b.s.keys[j], b.s.keys[i]
	b.s.objs[i], b.s.objs[j] = b.s.objs[j], b.s.objs[i]
}
