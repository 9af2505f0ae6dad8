package targets

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/detourhq/detour/internal/testbed"
)

// A clean stop is marked with a checkpoint of what etcd holds: a record written after the
// watcher's last checkpoint is read from etcd's history and checkpointed with the others; etcd's
// later revisions of another prefix change nothing. A start takes the marker (it is gone from disk
// before anything else), serves the checkpoint and the other keys as a provisional snapshot (still
// loading), and the resume from etcd replaces it with the same state, no longer provisional.
func TestACleanStopIsWhatEtcdHolds(t *testing.T) {
	t.Parallel()
	// An etcd of its own: a stop is marked clean only while etcd does not change, and the shared
	// one changes with every parallel test's writes.
	_, cli := startEtcd(t)
	prefix := testPrefix(t)
	r := withRecords(t, cli, prefix, 40)
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "index.checkpoint")
	marker := filepath.Join(t.TempDir(), "clean-stop")

	w := loaded(t, cli, prefix, path)
	if _, err := w.WriteCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if err := r.PutObject(ctx, testRecord(testKey(99), "a", "u", "b", 1, time.Now(), 0)); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, strings.TrimSuffix(prefix, "/")+"-other/x", "1"); err != nil {
		t.Fatal(err)
	}
	head, err := w.WriteCleanStop(ctx, marker)
	if err != nil {
		t.Fatalf("a clean stop after another prefix's write: %v", err)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Fatal(err)
	}
	want := watch(t, cli, prefix).Snapshot()

	cs, err := TakeCleanStop(marker)
	if cs == nil || err != nil {
		t.Fatalf("the start found no clean stop: %v %v", cs, err)
	}
	if got := cs.EtcdRevision(); got != head {
		t.Fatalf("the marker holds etcd's revision %d, the stop was checked at %d", got, head)
	}
	if _, err := os.Stat(marker); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the start left the marker on disk: %v", err)
	}
	p := Preload(path)
	p.UseCleanStop(cs)
	w2 := NewWatcher(cli, prefix, nil)
	w2.WithPreloaded(p)
	if !w2.ServeCleanStop(ctx) {
		t.Fatal("the clean stop is not served")
	}
	prov := w2.Snapshot()
	if !prov.Provisional() {
		t.Fatal("the clean stop's snapshot is not marked provisional")
	}
	sameState(t, "the clean stop", prov, want)
	if len(prov.Targets()) != 1 || prov.ObjectCount() != 41 {
		t.Fatalf("the clean stop holds %d targets and %d copies, want 1 and 41", len(prov.Targets()), prov.ObjectCount())
	}
	select {
	case <-w2.Ready():
		t.Fatal("the watcher says it is loaded before etcd was read")
	default:
	}
	run(t, w2)
	if w2.Snapshot().Provisional() {
		t.Fatal("the resumed snapshot is still provisional")
	}
	sameState(t, "resumed after the clean stop", w2.Snapshot(), want)
}

// A marker that does not match what etcd is found to be (here: a marker of another cluster's
// checkpoint, read against a fresh etcd) stops being served as soon as the resume finds out: the
// watcher says so and loads etcd instead. A damaged marker is not served, and is removed too.
func TestACleanStopEtcdDisagreesWithIsDropped(t *testing.T) {
	t.Parallel()
	_, cli := startEtcd(t) // as above: the shared etcd changes while the stop is marked
	prefix := testPrefix(t)
	withRecords(t, cli, prefix, 10)
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "index.checkpoint")
	w := loaded(t, cli, prefix, path)
	if _, err := w.WriteCheckpoint(); err != nil {
		t.Fatal(err)
	}
	marker := filepath.Join(t.TempDir(), "clean-stop")
	if _, err := w.WriteCleanStop(ctx, marker); err != nil {
		t.Fatal(err)
	}
	good, err := os.ReadFile(marker)
	if err != nil {
		t.Fatal(err)
	}

	_, other := startEtcd(t)
	var log testbed.Buffer
	w2 := NewWatcher(other, prefix, slog.New(slog.NewTextHandler(&log, nil)))
	cs, err := TakeCleanStop(marker)
	if err != nil {
		t.Fatal(err)
	}
	p := Preload(path)
	p.UseCleanStop(cs)
	w2.WithPreloaded(p)
	if !w2.ServeCleanStop(ctx) {
		t.Fatal("the clean stop is not served")
	}
	runAndSeeDropped(t, w2, &log, "the clean stop")

	bad := bytes.Clone(good)
	bad[len(bad)/2] ^= 1
	if err := os.WriteFile(marker, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	if cs, err := TakeCleanStop(marker); cs != nil || !errors.Is(err, ErrCheckpointDamaged) {
		t.Fatalf("a damaged marker: %v, %v", cs, err)
	}
	if _, err := os.Stat(marker); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a damaged marker is left on disk: %v", err)
	}
}

// runAndSeeDropped runs w, which serves a provisional snapshot (what) of records another etcd does
// not hold, and checks that the resume dropped it for a full read of that etcd (no copies), and
// said so in log.
func runAndSeeDropped(t *testing.T, w *Watcher, log *testbed.Buffer, what string) {
	t.Helper()
	prov := w.Snapshot()
	run(t, w)
	select {
	case <-prov.Superseded():
	default:
		t.Fatalf("%s's snapshot is still current", what)
	}
	if got := w.Snapshot(); got.Provisional() || got.ObjectCount() != 0 {
		t.Fatalf("after the resume from %s failed: provisional %v, %d copies (the other etcd has none)", what, got.Provisional(), got.ObjectCount())
	}
	if !strings.Contains(log.String(), "no longer serving it") {
		t.Fatalf("the watcher did not say it dropped %s:\n%s", what, log.String())
	}
}

// withRecords registers target "a" under prefix and n READY records at it.
func withRecords(t *testing.T, cli *clientv3.Client, prefix string, n int) *Registry {
	t.Helper()
	r := NewRegistry(cli, prefix)
	if _, err := r.CreateTarget(context.Background(), validTarget("a")); err != nil {
		t.Fatal(err)
	}
	putRecords(t, r, n, func(int) string { return "a" })
	return r
}

// FuzzDecodeCleanStop: a marker is read from disk at every start; no content may panic or be
// taken for a marker whose keys are not a clean stop's.
func FuzzDecodeCleanStop(f *testing.F) {
	for _, cs := range []*CleanStop{{revision: 7, etcdRev: 7, clusterID: 3, prefix: "/detour/v1/"},
		{revision: 9, etcdRev: 12, clusterID: 3, prefix: "/detour/v1/", kvs: []*mvccpb.KeyValue{
			{Key: []byte("/detour/v1/targets/a"), Value: []byte("x"), CreateRevision: 2, ModRevision: 8, Version: 3}}}} {
		b, err := encodeCleanStop(cs)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(cleanStopMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		cs, err := decodeCleanStop(b)
		if err != nil {
			return
		}
		if cs.prefix == "" || cs.etcdRev < cs.revision {
			t.Fatalf("accepted a marker of prefix %q at revision %d, etcd's %d", cs.prefix, cs.revision, cs.etcdRev)
		}
		for _, kv := range cs.kvs {
			if kv.ModRevision > cs.revision || len(kv.Key) <= len(cs.prefix) || !strings.HasPrefix(string(kv.Key), cs.prefix) {
				t.Fatalf("accepted %q at %d in a marker at %d of %q", kv.Key, kv.ModRevision, cs.revision, cs.prefix)
			}
		}
	})
}
