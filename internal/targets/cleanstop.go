package targets

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
)

// A clean stop is a checkpoint that is also what etcd holds. A replica whose etcd is a single
// member of its own (the embedded one) writes it when it stops: after its watcher has stopped and
// its checkpoint is written, once etcd has confirmed that nothing under the prefix changed after
// the checkpoint's revision. Such an etcd changes only while its process runs, so at the next
// start it holds exactly that state again, and the replica can serve redirects from the checkpoint
// while etcd restarts (tens of seconds at millions of records) instead of answering inline.
//
// The marker is a file the caller keeps with etcd's data (not with the checkpoint: a run with no
// checkpoint, or another one, must still take it) holding the checkpoint's revision, etcd's
// revision when the stop was checked, the cluster and prefix, and every key under the prefix but
// the object records at the checkpoint's revision (targets, policy, health, claims, agents: what a
// snapshot needs besides its index). Every start with that etcd takes it — reads it and removes
// it — before etcd starts, so that once etcd may change again no marker says otherwise; a marker
// that cannot be removed must stop the start (TakeCleanStop's error).
//
// Layout (integers little-endian): magic "DETOURCS", version u32 (1), revision i64, etcd revision
// i64, cluster id u64, prefix (u32 length, bytes), keys u32, each key (u32 length, a marshalled
// mvccpb.KeyValue), CRC-32C (Castagnoli) of everything before it, u32.

const (
	cleanStopMagic   = "DETOURCS"
	cleanStopVersion = 1
	// maxCleanStopBytes bounds the marker a start reads into memory: its keys are the small ones
	// (targets, policy, claims, agents), not the object records.
	maxCleanStopBytes = 64 << 20
)

// CleanStop is what a clean-stop marker holds.
type CleanStop struct {
	revision  int64 // the checkpoint's
	etcdRev   int64 // etcd's, when the stop was checked: what it is at the next start
	clusterID uint64
	prefix    string
	kvs       []*mvccpb.KeyValue
}

// EtcdRevision is etcd's revision when the stop was found clean: the revision the same etcd is
// at when it is back, if nothing changed it in between.
func (cs *CleanStop) EtcdRevision() int64 { return cs.etcdRev }

// WriteCleanStop makes the checkpoint what etcd holds and marks it so, for the next start to
// serve while etcd restarts. Call it when the replica stops, after its watcher and everything that
// writes to etcd have stopped, with etcd still up, and only when that etcd is the replica's own
// single member: nothing else may change it while the replica is down. Changes the watcher had
// not applied when it stopped (the janitor's resignation, a claim released at the stop) are read
// from etcd's history and the checkpoint written again with them. It refuses (with the reason)
// when etcd has more than one member, is another cluster, or keeps changing.
// It writes the marker to marker and returns etcd's revision it holds (CleanStop.EtcdRevision).
func (w *Watcher) WriteCleanStop(ctx context.Context, marker string) (int64, error) {
	if w.cp.path == "" {
		return 0, errors.New("no checkpoint file")
	}
	select {
	case <-w.ready:
	default:
		return 0, errors.New("no snapshot was loaded")
	}
	w.cp.mu.Lock()
	defer w.cp.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ml, err := w.cli.MemberList(ctx)
	if err != nil {
		return 0, fmt.Errorf("list etcd's members: %w", err)
	}
	if n := len(ml.Members); n != 1 {
		return 0, fmt.Errorf("etcd has %d members: the others may change it while this replica is down", n)
	}
	// A copy: catching up moves its revision, and the current snapshot may still be read.
	cur := *w.Snapshot()
	snap := &cur
	var cluster uint64
	var head int64
	for try := 1; ; try++ {
		now, id, err := w.head(ctx, 5*time.Second)
		head = now
		if err != nil {
			return 0, err
		}
		if cluster = id; cluster != w.cp.clusterID.Load() {
			return 0, fmt.Errorf("etcd is cluster %x, the checkpoint's is %x", cluster, w.cp.clusterID.Load())
		}
		if now <= snap.applied {
			break
		}
		if try > 3 {
			return 0, fmt.Errorf("etcd keeps changing: at revision %d, the snapshot caught up to %d", now, snap.applied)
		}
		// Revisions past the snapshot's: another prefix's writes, or this one's that the watcher
		// did not see before it stopped. Only the history tells which.
		if snap, _, err = w.catchUp(ctx, snap, now); err != nil {
			return 0, fmt.Errorf("read etcd's history after revision %d: %w", cur.applied, err)
		}
	}
	rev := snap.applied
	if rev != w.cp.written {
		if _, err := w.writeCheckpointLocked(snap, cluster); err != nil {
			return 0, err
		}
	}
	cs := &CleanStop{revision: rev, etcdRev: head, clusterID: cluster, prefix: w.prefix}
	objPrefix := w.prefix + "objects/"
	for _, r := range [][2]string{{w.prefix, objPrefix}, {clientv3.GetPrefixRangeEnd(objPrefix), clientv3.GetPrefixRangeEnd(w.prefix)}} {
		err := w.readRange(ctx, r[0], r[1], rev, func(kvs []*mvccpb.KeyValue) { cs.kvs = append(cs.kvs, kvs...) })
		if err != nil {
			return 0, err
		}
	}
	b, err := encodeCleanStop(cs)
	if err != nil {
		return 0, err
	}
	return head, writeFileAtomic(marker, b)
}

func encodeCleanStop(cs *CleanStop) ([]byte, error) {
	b := append([]byte(cleanStopMagic), 0, 0, 0, 0)
	binary.LittleEndian.PutUint32(b[len(cleanStopMagic):], cleanStopVersion)
	b = binary.LittleEndian.AppendUint64(b, uint64(cs.revision))
	b = binary.LittleEndian.AppendUint64(b, uint64(cs.etcdRev))
	b = binary.LittleEndian.AppendUint64(b, cs.clusterID)
	b = appendString(b, cs.prefix)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(cs.kvs)))
	for _, kv := range cs.kvs {
		m, err := proto.Marshal(kv)
		if err != nil {
			return nil, fmt.Errorf("encode %s: %w", kv.Key, err)
		}
		b = binary.LittleEndian.AppendUint32(b, uint32(len(m)))
		b = append(b, m...)
	}
	if len(b) > maxCleanStopBytes {
		return nil, fmt.Errorf("%d bytes of keys besides the object records: more than a clean stop holds (%d)", len(b), maxCleanStopBytes)
	}
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli)), nil
}

func decodeCleanStop(b []byte) (*CleanStop, error) {
	if len(b) < len(cleanStopMagic)+4+8+8+8+4+4+4 || string(b[:len(cleanStopMagic)]) != cleanStopMagic {
		return nil, damaged("not a clean-stop marker (no %s header)", cleanStopMagic)
	}
	body, sum := b[:len(b)-4], binary.LittleEndian.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, castagnoli) != sum {
		return nil, damaged("clean-stop marker checksum mismatch")
	}
	r := bytes.NewReader(body[len(cleanStopMagic):])
	var hdr struct {
		Version   uint32
		Revision  int64
		EtcdRev   int64
		ClusterID uint64
		PrefixLen uint32
	}
	if err := binary.Read(r, binary.LittleEndian, &hdr); err != nil {
		return nil, damaged("clean-stop marker header: %v", err)
	}
	if hdr.Version != cleanStopVersion {
		return nil, damaged("clean-stop marker version %d, this release reads %d", hdr.Version, cleanStopVersion)
	}
	if hdr.Revision <= 0 || hdr.EtcdRev < hdr.Revision || hdr.PrefixLen == 0 || int64(hdr.PrefixLen) > int64(r.Len()) || hdr.PrefixLen > maxCheckpointString {
		return nil, damaged("clean-stop marker: revision %d, etcd's %d, prefix of %d bytes", hdr.Revision, hdr.EtcdRev, hdr.PrefixLen)
	}
	prefix := make([]byte, hdr.PrefixLen)
	r.Read(prefix)
	cs := &CleanStop{revision: hdr.Revision, etcdRev: hdr.EtcdRev, clusterID: hdr.ClusterID, prefix: string(prefix)}
	var n uint32
	if err := binary.Read(r, binary.LittleEndian, &n); err != nil {
		return nil, damaged("clean-stop marker: key count: %v", err)
	}
	// Each key takes its length and a marshalled key longer than the prefix: a count the bytes
	// cannot hold is refused before anything is allocated for it.
	if int64(n) > int64(r.Len())/(4+2+int64(len(prefix))) {
		return nil, damaged("clean-stop marker: %d keys in %d bytes", n, r.Len())
	}
	for i := uint32(0); i < n; i++ {
		var l uint32
		if err := binary.Read(r, binary.LittleEndian, &l); err != nil || int64(l) > int64(r.Len()) {
			return nil, damaged("clean-stop marker: key %d of %d cut short", i, n)
		}
		m := make([]byte, l)
		r.Read(m)
		kv := &mvccpb.KeyValue{}
		if err := proto.Unmarshal(m, kv); err != nil {
			return nil, damaged("clean-stop marker: key %d: %v", i, err)
		}
		if len(kv.Key) <= len(prefix) || !bytes.HasPrefix(kv.Key, prefix) || bytes.HasPrefix(kv.Key, []byte(cs.prefix+"objects/")) || kv.ModRevision > cs.revision {
			return nil, damaged("clean-stop marker: key %q (revision %d) is not one a clean stop at %d holds", kv.Key, kv.ModRevision, cs.revision)
		}
		cs.kvs = append(cs.kvs, kv)
	}
	if r.Len() != 0 {
		return nil, damaged("clean-stop marker: %d bytes after its keys", r.Len())
	}
	return cs, nil
}

// TakeCleanStop reads the clean-stop marker at p and removes it, durably, before the etcd it
// describes starts. (nil, nil): there is none. A damaged marker is removed and its error wraps
// ErrCheckpointDamaged; any other error means a marker may still be there, and the etcd must not
// start until someone removes it.
func TakeCleanStop(p string) (*CleanStop, error) {
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	b, rerr := readAtMost(f, maxCleanStopBytes+4)
	f.Close()
	if err := os.Remove(p); err != nil {
		return nil, fmt.Errorf("remove the clean-stop marker: %w", err)
	}
	if err := syncDir(filepath.Dir(p)); err != nil {
		return nil, fmt.Errorf("make the clean-stop marker's removal durable: %w", err)
	}
	if rerr != nil {
		return nil, rerr
	}
	return decodeCleanStop(b)
}

func readAtMost(f *os.File, n int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(f, n+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > n {
		return nil, damaged("more than %d bytes", n)
	}
	return b, nil
}

// writeFileAtomic writes b to path through a synced temporary file renamed over it.
func writeFileAtomic(path string, b []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(dir)
}

// syncDir makes a rename or removal in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// ServeCleanStop makes the checkpoint current as a provisional snapshot when the start took a
// clean-stop marker that matches it (WithPreloaded): the index and the other keys as they were at
// the stop, which is what the replica's own etcd will hold once it is back. It waits for the
// checkpoint to be decoded. The watcher is still loading (Ready stays open) until Run has resumed
// from etcd and published the snapshot that replaces it; Snapshot().Provisional() tells the two
// apart. Call before Run. It reports whether the provisional snapshot is current.
func (w *Watcher) ServeCleanStop(ctx context.Context) bool {
	p := w.cp.pre
	if p == nil {
		return false
	}
	cs := p.clean
	if cs == nil {
		return false
	}
	select {
	case <-p.done:
	case <-ctx.Done():
		return false
	}
	reason := ""
	switch cp := p.cp; {
	case p.err != nil:
		reason = p.err.Error()
	case cp.revision != cs.revision || cp.clusterID != cs.clusterID || cp.prefix != cs.prefix:
		reason = fmt.Sprintf("the checkpoint is at revision %d of cluster %x, the marker's at %d of %x", cp.revision, cp.clusterID, cs.revision, cs.clusterID)
	case cs.prefix != w.prefix:
		reason = fmt.Sprintf("the marker is of prefix %q, this watcher's is %q", cs.prefix, w.prefix)
	}
	if reason != "" {
		w.log.Warn("clean-stop marker not used; serving once etcd is up", "checkpoint", p.path, "reason", reason)
		return false
	}
	snap := emptySnapshot()
	snap.objects = p.cp.objects
	for _, kv := range cs.kvs {
		w.apply(snap, nil, mvccpb.PUT, kv)
	}
	snap.Revision, snap.TargetsRevision, snap.applied = cs.revision, cs.revision, cs.revision
	w.publishProvisional(snap)
	w.log.Info("serving the index of the last clean stop until etcd is back (redirects only: no fill is granted, admin calls wait)",
		"revision", cs.revision, "objects", snap.objects.count, "targets", len(snap.targets))
	return true
}

// publishProvisional makes snap current as a provisional snapshot: served, but not the load that
// makes the watcher ready (Ready stays open until Run publishes one from etcd).
func (w *Watcher) publishProvisional(snap *Snapshot) {
	snap.provisional = true
	w.finish(snap)
	snap.Built = time.Now()
	old := w.cur.Swap(snap)
	close(old.superseded)
}

// DropProvisional stops serving a provisional snapshot: etcd disagrees with the clean stop or the
// database file it came from (why says how), so Place answers inline until a load is done.
func (w *Watcher) DropProvisional(why string) {
	if cur := w.Snapshot(); cur.provisional {
		if w.cur.CompareAndSwap(cur, emptySnapshot()) {
			close(cur.superseded)
			w.log.Warn("etcd is not what the provisional snapshot was read from: no longer serving it; placement answers inline until the load is done", "reason", why)
		}
	}
}
