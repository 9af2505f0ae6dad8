package targets

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/detourhq/detour/internal/etcdembed"
)

// objectsAt reads the object records at rev with one plain range: what a load at rev must index.
func objectsAt(t *testing.T, cli *clientv3.Client, rev int64) map[Key][]string {
	t.Helper()
	resp, err := cli.Get(context.Background(), DefaultPrefix+"objects/", clientv3.WithPrefix(), clientv3.WithRev(rev))
	if err != nil {
		t.Fatal(err)
	}
	homes, err := cli.Get(context.Background(), DefaultPrefix+"homes/", clientv3.WithPrefix(), clientv3.WithRev(rev))
	if err != nil {
		t.Fatal(err)
	}
	w := NewWatcher(nil, "", nil)
	snap := emptySnapshot()
	for _, kv := range homes.Kvs {
		w.apply(snap, nil, mvccpb.PUT, kv)
	}
	want := map[Key][]string{}
	for _, kv := range resp.Kvs {
		k, o, ok := w.decodeObject(kv.Key[len(DefaultPrefix+"objects/"):], kv.Value, kv.ModRevision, &homeCache{shared: snap.homes})
		if ok {
			want[k] = append(want[k], o.Target())
		}
	}
	return want
}

func targetsOf(snap *Snapshot) map[Key][]string {
	got := map[Key][]string{}
	snap.EachObject(func(k Key, o *Object) bool { got[k] = append(got[k], o.Target()); return true })
	return got
}

func sameCopies(a, b map[Key][]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, ts := range a {
		if !slices.Equal(slices.Sorted(slices.Values(ts)), slices.Sorted(slices.Values(b[k]))) {
			return false
		}
	}
	return true
}

// How a load reads etcd.
type readMode int

const (
	streamed readMode = iota // RangeStreams over gRPC
	paged                    // pages over gRPC (an etcd without RangeStream)
	local                    // in process, from the embedded member
)

func (m readMode) String() string { return [...]string{"streamed", "paged", "local"}[m] }

// watcherReading is a watcher that reads etcd as mode says, in small chunks.
func watcherReading(srv *etcdembed.Server, cli *clientv3.Client, mode readMode, chunk int64) *Watcher {
	w := NewWatcher(cli, "", nil)
	w.pageSize, w.localChunk = chunk, chunk
	w.noStream.Store(mode == paged)
	if mode == local {
		w.ReadLocally(srv.Range)
	}
	return w
}

// A load, streamed, by pages or in process, is the state at one revision, however many writes land while it
// reads: every record written up to that revision, none after.
func TestLoadIsTheStateAtOneRevisionWhileWritesContinue(t *testing.T) {
	srv, cli := startEtcd(t)
	ctx := context.Background()
	protoReg, compactReg, reg := NewRegistry(cli, ""), NewRegistry(cli, ""), NewRegistry(cli, "")
	protoReg.SetRecordEncoding(EncodingProto)
	compactReg.SetRecordEncoding(EncodingCompact)
	const base = 3000
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < base; i += 8 {
				reg := []*Registry{protoReg, compactReg, reg}[i%3] // every encoding, as after upgrades
				if err := reg.PutObject(ctx, testRecord(testKey(i), fmt.Sprint("t", i%3), "u", "b", 1, time.Now(), 0)); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	wctx, stop := context.WithCancel(ctx)
	var written atomic.Int64
	go func() {
		for i := base; wctx.Err() == nil; i++ {
			if reg.PutObject(wctx, testRecord(testKey(i), "t9", "u", "b", 1, time.Now(), 0)) == nil {
				written.Add(1)
			}
			if i%7 == 0 { // and deletions of loaded records
				_, _, _ = reg.DeleteObjects(wctx, testKey(i-base), "test", time.Now())
			}
		}
	}()
	defer stop()
	for _, mode := range []readMode{streamed, paged, local} {
		w := watcherReading(srv, cli, mode, 100)
		before := written.Load()
		rev, err := w.load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if written.Load() == before {
			t.Fatalf("%s: no write landed during the load; the test proves nothing", mode)
		}
		want := objectsAt(t, cli, rev)
		if got := targetsOf(w.Snapshot()); !sameCopies(got, want) {
			t.Fatalf("%s: the load at revision %d holds %d keys; etcd at that revision %d", mode, rev, len(got), len(want))
		}
		if w.Snapshot().Revision != rev || len(want) < base/2 {
			t.Fatalf("%s: snapshot revision %d (load %d), %d keys", mode, w.Snapshot().Revision, rev, len(want))
		}
	}
}

// Parallel streams, pages (for an etcd without RangeStream) and in-process reads split the prefix into ranges at
// points of the object records' hex key space; together the ranges must hold every key under the
// prefix, also those that sort between or around those points, once.
func TestPagesReadEveryKeyTheStreamReads(t *testing.T) {
	srv, cli := startEtcd(t)
	ctx := context.Background()
	for i := range 600 {
		if _, err := cli.Put(ctx, DefaultPrefix+"objects/"+testKey(i*1_000_003)+"/t", "x"); err != nil {
			t.Fatal(err)
		}
	}
	odd := []string{"objects/", "objects", "objects0", "objects/0", "objects/0g/t", "objects/0G", "objects/f", "objects/fg",
		"objects/ff", "objects/g", "objects/Z", "objects/\xff", "objects/0f\xff", "objects0/x", "policy", "targets/a", "zzz", "\xff"}
	for _, k := range odd {
		if _, err := cli.Put(ctx, DefaultPrefix+k, "x"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := cli.Put(ctx, "/detour/v0/objects/x", "not ours"); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(ctx, "x")
	if err != nil {
		t.Fatal(err)
	}
	read := func(mode readMode) []string {
		w := watcherReading(srv, cli, mode, 7)
		var mu sync.Mutex
		var keys []string
		if err := w.read(ctx, resp.Header.Revision, func(kvs []*mvccpb.KeyValue) {
			mu.Lock()
			defer mu.Unlock()
			for _, kv := range kvs {
				keys = append(keys, string(kv.Key))
			}
		}); err != nil {
			t.Fatal(err)
		}
		slices.Sort(keys)
		return keys
	}
	stream := read(streamed)
	if len(stream) != 600+len(odd) {
		t.Fatalf("the stream read %d keys, want %d", len(stream), 600+len(odd))
	}
	if len(slices.Compact(slices.Clone(stream))) != len(stream) {
		t.Fatal("the stream read a key twice")
	}
	for _, mode := range []readMode{paged, local} {
		if got := read(mode); !slices.Equal(stream, got) {
			t.Fatalf("%s read %d keys, the stream %d", mode, len(got), len(stream))
		}
	}
}

// A built index holds none of the arrays the load filled (they had room for the expected share):
// each leaf is a copy at its size, so that the load's arrays die with its other garbage rather
// than keep the spans they share with it alive.
func TestALoadedIndexKeepsNoneOfTheLoadsArrays(t *testing.T) {
	l := newLoader(NewWatcher(nil, "", nil), 0)
	filled := map[*Key]bool{}
	for s := range 64 {
		n := 1 + s%12
		sh := shard{keys: make([]Key, 0, n+s%3), objs: make([]Object, 0, n+s%3)}
		for i := range n {
			var k Key
			k[0], k[1] = byte(s), byte(i)
			sh.keys, sh.objs = append(sh.keys, k), append(sh.objs, Object{Size: uint64(i)})
		}
		filled[&sh.keys[0]] = true
		l.leaves[s*997%leafCount] = sh
	}
	ix := l.build()
	leaves := 0
	ix.each(func(s *shard) bool {
		leaves++
		if filled[&s.keys[0]] {
			t.Errorf("a leaf of %d copies (room for %d) is the array the load filled", len(s.keys), cap(s.keys))
		}
		return true
	})
	if leaves != 64 || ix.count != 400 {
		t.Fatalf("built %d leaves holding %d copies, want 64 and 400", leaves, ix.count)
	}
}
