package targets

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/detourhq/detour/internal/etcdembed"
	"github.com/detourhq/detour/internal/testbed"
)

// etcdIn starts an embedded etcd on dir and a client of it; stop closes both (the test's end does
// too).
func etcdIn(t *testing.T, dir string) (cli *clientv3.Client, stop func()) {
	t.Helper()
	srv, err := etcdembed.Start(context.Background(), etcdembed.Config{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	cli, err = clientv3.New(srv.ClientConfig())
	if err != nil {
		srv.Close()
		t.Fatal(err)
	}
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			cli.Close()
			srv.Close()
		}
	}
	t.Cleanup(stop)
	return cli, stop
}

// A start copies the member's database file while no etcd runs (a running member's is refused),
// serves a walk of it as a provisional snapshot, and resumes from it once etcd is up. Nothing
// changed since the file: the resume replays nothing and says nothing was missing. Writes that
// the file lacks (as when a member dies with entries committed but not yet applied to its file;
// here, written after the copy): the provisional snapshot is the file's, the resumed one is what
// a full read gives, and the watcher says when the snapshot that lacked them was replaced.
func TestAWalkOfTheMembersFileIsServedUntilEtcdIsUp(t *testing.T) {
	t.Parallel()
	dir, prefix, ctx := t.TempDir(), testPrefix(t), context.Background()
	db := filepath.Join(dir, "etcd", "member", "snap", "db")
	cli, stop := etcdIn(t, filepath.Join(dir, "etcd"))
	r := withRecords(t, cli, prefix, 30)
	if _, err := cli.Put(ctx, strings.TrimSuffix(prefix, "/")+"-other/x", "1"); err != nil {
		t.Fatal(err)
	}
	if _, err := CopyMemberDatabase(db, filepath.Join(dir, "running.copy")); err == nil {
		t.Fatal("a running member's database file was copied")
	}
	if _, err := os.Stat(filepath.Join(dir, "running.copy")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a refused copy left a file: %v", err)
	}
	atStop := watch(t, cli, prefix).Snapshot()
	stop()

	quiet, behind := filepath.Join(dir, "quiet.copy"), filepath.Join(dir, "behind.copy")
	for _, p := range []string{quiet, behind} {
		if n, err := CopyMemberDatabase(db, p); err != nil || n == 0 {
			t.Fatalf("copy of a stopped member's file: %d bytes, %v", n, err)
		}
	}
	cli, _ = etcdIn(t, filepath.Join(dir, "etcd"))
	r = NewRegistry(cli, prefix)

	w := NewWatcher(cli, prefix, nil)
	if !w.ServeMemberCopy(ctx, quiet) {
		t.Fatal("the walk of the file is not served")
	}
	if _, err := os.Stat(quiet); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the walked copy is left on disk: %v", err)
	}
	prov := w.Snapshot()
	if !prov.Provisional() {
		t.Fatal("the walked snapshot is not marked provisional")
	}
	sameState(t, "the walk of the file", prov, atStop)
	if prov.ObjectCount() != 30 || len(prov.Targets()) != 1 {
		t.Fatalf("the walk holds %d copies and %d targets, want 30 and 1", prov.ObjectCount(), len(prov.Targets()))
	}
	select {
	case <-w.Ready():
		t.Fatal("the watcher says it is loaded before etcd was read")
	default:
	}
	run(t, w)
	if w.Snapshot().Provisional() {
		t.Fatal("the resumed snapshot is still provisional")
	}
	sameState(t, "resumed with nothing to replay", w.Snapshot(), atStop)
	if b := w.MemberCopyBehind(); !b.IsZero() {
		t.Fatalf("a resume that replayed nothing says the file was behind (%v)", b)
	}

	// etcd moves on past the second copy's revision: a copy retired, one added.
	if n, _, err := r.DeleteObjects(ctx, testKey(0), "test", time.Now()); err != nil || n != 1 {
		t.Fatalf("retire key 0: %d, %v", n, err)
	}
	if err := r.PutObject(ctx, testRecord(testKey(99), "a", "u", "b", 1, time.Now(), 0)); err != nil {
		t.Fatal(err)
	}
	var log testbed.Buffer
	w2 := NewWatcher(cli, prefix, slog.New(slog.NewTextHandler(&log, nil)))
	if !w2.ServeMemberCopy(ctx, behind) {
		t.Fatal("the walk of the second copy is not served")
	}
	sameState(t, "the walk of a file etcd has moved past", w2.Snapshot(), atStop)
	before := time.Now()
	run(t, w2)
	sameState(t, "resumed past the file", w2.Snapshot(), watch(t, cli, prefix).Snapshot())
	if w2.Snapshot().ObjectCount() != 30 || w2.Snapshot().Provisional() {
		t.Fatalf("after the resume: %d copies (want 30: one retired, one added), provisional %v", w2.Snapshot().ObjectCount(), w2.Snapshot().Provisional())
	}
	if b := w2.MemberCopyBehind(); b.Before(before) {
		t.Fatalf("a resume that replayed events says the file was not behind (%v)", b)
	}
	if !strings.Contains(log.String(), "lacked events") {
		t.Fatalf("the watcher did not say the file lacked events:\n%s", log.String())
	}
}

// A walk is not served from what is not a database file, and one that etcd is behind (here a
// fresh etcd; in life an etcd restored from an older backup) stops being served as soon as the
// resume finds out: the watcher says so, reads every record instead, and counts what was served as
// behind etcd from when that read was published. (Nothing compares a file's cluster: the control
// plane walks only its own member's file, taken before that member starts.)
func TestAWalkEtcdDisagreesWithIsDropped(t *testing.T) {
	t.Parallel()
	dir, prefix, ctx := t.TempDir(), testPrefix(t), context.Background()
	cli, stop := etcdIn(t, filepath.Join(dir, "etcd"))
	withRecords(t, cli, prefix, 10)
	stop()
	path := filepath.Join(dir, "db.copy")
	if _, err := CopyMemberDatabase(filepath.Join(dir, "etcd", "member", "snap", "db"), path); err != nil {
		t.Fatal(err)
	}

	_, other := startEtcd(t) // a fresh etcd, at a revision before the file's
	var log testbed.Buffer
	w := NewWatcher(other, prefix, slog.New(slog.NewTextHandler(&log, nil)))
	if !w.ServeMemberCopy(ctx, path) {
		t.Fatal("the walk is not served")
	}
	runAndSeeDropped(t, w, &log, "the walk")
	if b := w.MemberCopyBehind(); b.IsZero() || b.After(time.Now()) {
		t.Fatalf("after a walk etcd did not follow on from, the watcher says it was behind at %v", b)
	}

	junk := filepath.Join(dir, "junk.copy")
	if err := os.WriteFile(junk, []byte(strings.Repeat("not a database ", 1000)), 0o600); err != nil {
		t.Fatal(err)
	}
	w2 := NewWatcher(other, prefix, nil)
	if w2.ServeMemberCopy(ctx, junk) {
		t.Fatal("a file that is no database was served")
	}
	if w2.Snapshot().Provisional() {
		t.Fatal("a refused walk left a provisional snapshot")
	}
	if _, err := os.Stat(junk); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a refused copy is left on disk: %v", err)
	}
	if _, err := CopyMemberDatabase(filepath.Join(dir, "none", "db"), filepath.Join(dir, "none.copy")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a member without a file: %v, want not-exist", err)
	}
}
