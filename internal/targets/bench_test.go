package targets

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"runtime"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
)

// objectKV is an object record as the watcher reads it from etcd.
func objectKV(w *Watcher, i int, target string) *mvccpb.KeyValue {
	sum := sha256.Sum256([]byte(fmt.Sprint(i)))
	key := hex.EncodeToString(sum[:])
	o := testRecord(key, target, "uid-"+target, "bucket-"+target, uint64(1<<20+i), time.Unix(1_800_000_000, 0), 24*time.Hour)
	v, _ := proto.Marshal(o)
	return &mvccpb.KeyValue{Key: []byte(w.prefix + "objects/" + key + "/" + target), Value: v, ModRevision: int64(i + 2)}
}

func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// BenchmarkIndexMemory reports the heap a replica's snapshot holds per indexed object, built
// through the same decode-and-apply path as a load from etcd.
func BenchmarkIndexMemory(b *testing.B) {
	for _, n := range []int{100_000, 1_000_000} {
		b.Run(fmt.Sprintf("objects=%d", n), func(b *testing.B) {
			for b.Loop() {
				w := NewWatcher(nil, "", nil)
				before := heapInUse()
				snap := emptySnapshot()
				ib := newIndexBuilder(snap.objects)
				targets := []string{"us-a", "us-b", "eu-a", "eu-b"}
				for i := range n {
					w.apply(snap, ib, mvccpb.PUT, objectKV(w, i, targets[i%len(targets)]))
				}
				snap.objects = ib.build()
				after := heapInUse()
				if snap.ObjectCount() != n {
					b.Fatalf("indexed %d", snap.ObjectCount())
				}
				b.ReportMetric(float64(after-before)/float64(n), "heap-bytes/object")
				runtime.KeepAlive(snap)
			}
		})
	}
}

// BenchmarkApplyEvent is the cost of one watch event (a new READY object) against an index of
// 1e6 objects: one shard copy, not a copy of the whole index.
func BenchmarkApplyEvent(b *testing.B) {
	w := NewWatcher(nil, "", nil)
	snap := emptySnapshot()
	ib := newIndexBuilder(snap.objects)
	for i := range 1_000_000 {
		w.apply(snap, ib, mvccpb.PUT, objectKV(w, i, "us-a"))
	}
	snap.objects = ib.build()
	w.cur.Store(snap)
	ev := objectKV(w, 2_000_000, "us-b")
	b.ReportAllocs()
	for b.Loop() {
		w.applyEvents([]*clientv3.Event{{Type: mvccpb.PUT, Kv: ev}})
	}
}

// BenchmarkWriteRecord is one record written as a fill's report writes it (a transaction; with
// home-ref, one that also puts the home unless etcd holds it as it is), on the embedded etcd, by
// encoding: what naming the home costs a write.
func BenchmarkWriteRecord(b *testing.B) {
	_, cli := startEtcd(b)
	for _, enc := range []RecordEncoding{EncodingCompact, EncodingHomeRef} {
		b.Run(enc.String(), func(b *testing.B) {
			r := NewRegistry(cli, fmt.Sprintf("/bench-%s/", enc))
			r.SetRecordEncoding(enc)
			i := 0
			for b.Loop() {
				sum := sha256.Sum256([]byte(fmt.Sprint(i)))
				o := testRecord(hex.EncodeToString(sum[:]), "us-a", "uid-us-a", "bucket-us-a", 1<<20, time.Now(), 24*time.Hour)
				if err := r.PutObject(context.Background(), o); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}
