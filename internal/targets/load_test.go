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
)

// objectsAt reads the object records at rev with one plain range: what a load at rev must index.
func objectsAt(t *testing.T, cli *clientv3.Client, rev int64) map[Key][]string {
	t.Helper()
	resp, err := cli.Get(context.Background(), DefaultPrefix+"objects/", clientv3.WithPrefix(), clientv3.WithRev(rev))
	if err != nil {
		t.Fatal(err)
	}
	w := NewWatcher(nil, "", nil)
	want := map[Key][]string{}
	for _, kv := range resp.Kvs {
		k, o, ok := w.decodeObject(kv.Key[len(DefaultPrefix+"objects/"):], kv.Value, kv.ModRevision, &homeCache{})
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

// A load, streamed or by pages, is the state at one revision, however many writes land while it
// reads: every record written up to that revision, none after.
func TestLoadIsTheStateAtOneRevisionWhileWritesContinue(t *testing.T) {
	_, cli := startEtcd(t)
	ctx := context.Background()
	protoReg, compactReg := NewRegistry(cli, ""), NewRegistry(cli, "")
	protoReg.SetRecordEncoding(EncodingProto)
	const base = 3000
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < base; i += 8 {
				reg := []*Registry{protoReg, compactReg}[i%2] // both encodings, as after an upgrade
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
			if compactReg.PutObject(wctx, testRecord(testKey(i), "t9", "u", "b", 1, time.Now(), 0)) == nil {
				written.Add(1)
			}
			if i%7 == 0 { // and deletions of loaded records
				_, _, _ = compactReg.DeleteObjects(wctx, testKey(i-base), "test", time.Now())
			}
		}
	}()
	defer stop()
	for _, pages := range []bool{false, true} {
		w := NewWatcher(cli, "", nil)
		w.pageSize = 100
		w.noStream.Store(pages)
		before := written.Load()
		rev, err := w.load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if written.Load() == before {
			t.Fatalf("pages %v: no write landed during the load; the test proves nothing", pages)
		}
		want := objectsAt(t, cli, rev)
		if got := targetsOf(w.Snapshot()); !sameCopies(got, want) {
			t.Fatalf("pages %v: the load at revision %d holds %d keys; etcd at that revision %d", pages, rev, len(got), len(want))
		}
		if w.Snapshot().Revision != rev || len(want) < base/2 {
			t.Fatalf("pages %v: snapshot revision %d (load %d), %d keys", pages, w.Snapshot().Revision, rev, len(want))
		}
	}
}

// Parallel streams and pages (for an etcd without RangeStream) split the prefix into ranges at
// points of the object records' hex key space; together the ranges must hold every key under the
// prefix, also those that sort between or around those points, once.
func TestPagesReadEveryKeyTheStreamReads(t *testing.T) {
	_, cli := startEtcd(t)
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
	read := func(pages bool) []string {
		w := NewWatcher(cli, "", nil)
		w.pageSize = 7
		w.noStream.Store(pages)
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
	stream, pages := read(false), read(true)
	if len(stream) != 600+len(odd) {
		t.Fatalf("the stream read %d keys, want %d", len(stream), 600+len(odd))
	}
	if !slices.Equal(stream, pages) || len(slices.Compact(slices.Clone(stream))) != len(stream) {
		t.Fatalf("pages read %d keys, the stream %d", len(pages), len(stream))
	}
}
