package targets

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
)

// A start from the embedded member's own database file.
//
// An embedded etcd answers nothing until it has restarted, and most of its restart is rebuilding
// its key index: one goroutine inserting every key into a B-tree, in revision order, which at 1e6
// records took 6.5 s of the 7.5-8.8 s etcd needed on two cores. The file it restarts from already
// holds everything a load would then read from it, as of the last revision etcd applied. So a
// start that has no clean stop to serve copies that file before etcd opens it, walks the copy in
// revision order as a load from a copy does (dbcopy.go) while etcd restarts, and serves the result
// as a provisional snapshot, as a clean stop's is served. Once etcd is up, Run resumes from that
// snapshot: it replays the history etcd holds after the copy's revision (entries etcd had
// committed but not yet applied to the file when the last process died) instead of reading every
// record again.
//
// A provisional snapshot that etcd's history had moved past may have been served with a record
// that a replayed event retired; MemberCopyBehind says when such a snapshot was replaced, so that
// the bytes of what it retired are kept a grace period longer.

// memberCopyMargin is the room a copy of the member's file leaves free beyond roomFor's margin.
const memberCopyMargin = 128 << 20

// CopyMemberDatabase copies the database file of an etcd member that is not running (src, its
// member/snap/db) to dst, and returns its size. The file is opened read-only first, which waits
// at most a second for its lock: a running member holds it, and a copy of a file being written is
// no snapshot of anything. dst is replaced; it is removed again on failure.
func CopyMemberDatabase(src, dst string) (int64, error) {
	_ = os.Remove(dst) // one an earlier start left (killed before it walked it) holds room
	st, err := os.Stat(src)
	if err != nil {
		return 0, err
	}
	// The copy holds its room until the walk ends, while etcd restarts beside it: room for etcd's
	// first WAL file (64 MiB preallocated) and more is kept besides roomFor's margin.
	if err := roomFor(filepath.Dir(dst), st.Size()+memberCopyMargin); err != nil {
		return 0, err
	}
	db, err := bolt.Open(src, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		return 0, fmt.Errorf("open etcd's database %s read-only: %w", src, err)
	}
	defer db.Close()
	// With the lock held no process writes the file: it is copied as it is (copy_file_range), not
	// page by page through a transaction.
	in, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, fmt.Errorf("copy etcd's database: %w", err)
	}
	n, err := io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(dst)
		return 0, fmt.Errorf("copy etcd's database to %s: %w", dst, err)
	}
	return n, nil
}

// ServeMemberCopy walks the copy of the embedded member's database at path (CopyMemberDatabase)
// and makes what it holds under the watcher's prefix current as a provisional snapshot; Run then
// resumes from it once etcd is up. It removes the copy. The watcher is still loading (Ready stays
// open) until Run has published the snapshot that replaces it. Call before Run. It reports whether
// the provisional snapshot is current: false when the copy could not be read (logged), and the
// first load is then an ordinary one.
func (w *Watcher) ServeMemberCopy(ctx context.Context, path string) bool {
	began := time.Now()
	w.progress.records.Store(0)
	w.progress.expected.Store(0)
	w.progress.began.Store(began.UnixNano())
	snap, l, rev, err := w.walkFile(ctx, path, 0)
	if err != nil {
		if ctx.Err() == nil {
			w.log.Warn("cannot walk the copy of the embedded etcd's database; serving once etcd is up", "path", path, "err", err)
		}
		return false
	}
	snap.objects = l.build()
	snap.Revision, snap.TargetsRevision, snap.applied = rev, rev, rev
	w.walked = snap
	w.publishProvisional(snap)
	w.log.Info("serving the index in the embedded etcd's database file until etcd is back (redirects only: no fill is granted, admin calls wait)",
		"revision", rev, "objects", snap.objects.count, "targets", len(snap.targets),
		"took", time.Since(began).Round(time.Millisecond).String())
	return true
}

// MemberCopyBehind is when a provisional snapshot walked from the embedded member's database was
// replaced by one that replayed events it lacked, or by a full read after etcd was found not to
// follow on from it (zero: neither happened; far in the future while that full read runs). It may
// have answered with a record one of those events retired.
func (w *Watcher) MemberCopyBehind() time.Time {
	if ns := w.behind.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// resumeWalked publishes walked, the snapshot ServeMemberCopy served, with etcd's history since
// its revision: the first load of a start that served the member's database file.
func (w *Watcher) resumeWalked(ctx context.Context, walked *Snapshot) (int64, error) {
	began := time.Now()
	now, cluster, err := w.head(ctx, 30*time.Second)
	if err != nil {
		return 0, err
	}
	w.cp.clusterID.Store(cluster)
	if walked.applied > now {
		return 0, unusable("the database file was at revision %d, etcd restarted at %d", walked.applied, now)
	}
	snap := *walked
	snap.provisional, snap.superseded = false, make(chan struct{})
	resumed, events, err := w.followFrom(ctx, &snap, now, "the database file")
	if err != nil {
		return 0, err
	}
	if events > 0 {
		// Before the publish that lets the janitor start.
		w.behind.Store(time.Now().UnixNano())
	}
	w.invalidations.reset(resumed.applied)
	w.publish(resumed)
	if events > 0 {
		w.log.Warn("the index served from the embedded etcd's database file lacked events etcd had committed; they are applied now",
			"events_replayed", events, "file_revision", walked.applied, "revision", resumed.applied)
	}
	w.log.Info("snapshot resumed from the embedded etcd's database file", "file_revision", walked.applied,
		"revision", resumed.applied, "events_replayed", events, "targets", len(resumed.targets), "objects", resumed.objects.count,
		"took", time.Since(began).Round(time.Millisecond).String())
	return resumed.applied, nil
}
