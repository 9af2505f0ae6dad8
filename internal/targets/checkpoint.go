package targets

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"time"
)

// A checkpoint is a replica's object index written to a local file, with the etcd revision it is
// exact at. A start that finds one reads it (a sequential read of fixed-size entries, already in
// leaf order) instead of every record from etcd (a random read per record in etcd's database),
// then reads the rest of the state at that revision and follows etcd's history from it to now
// before it serves: the index it serves is the one a full read would have built. A checkpoint
// that etcd's history no longer reaches (compacted), that is of another cluster or prefix, or
// ahead of etcd (a restored etcd), or that is damaged, is set aside for a full read.
//
// Layout (integers little-endian):
//
//	magic "DETOURIX", version u32 (1)
//	revision i64, etcd cluster id u64, prefix (u32 length, bytes)
//	homes: count u32, each five strings (u32 length, bytes): target, target uid, bucket, prefix,
//	  media type
//	copies u64
//	leaves, in increasing leaf number: leaf u32, entries u32, then each entry (entrySize bytes):
//	  key [32], size u64, created i64, expires i64, mod revision i64, generation i64,
//	  sha256 [32], sha1 [20], crc32c u32, home u32, flags u8 (1: transient)
//	end of leaves: u32 0xffffffff
//	CRC-32C (Castagnoli) of everything before it, u32
//
// The home of an entry is its number in the file's home list.

const (
	checkpointMagic   = "DETOURIX"
	checkpointVersion = 1
	entrySize         = 32 + 8*5 + 32 + 20 + 4 + 4 + 1
	endOfLeaves       = 0xffffffff
	// Bounds a reader holds a file to before it allocates for what the file says.
	maxCheckpointString = 4096
	maxCheckpointHomes  = 1 << 20
	// batchEntries bounds the entries read at once, and those a leaf is sized for before they
	// are there: a file's counts are not trusted with memory.
	batchEntries = 4096
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checkpoint is what a checkpoint file holds.
type checkpoint struct {
	revision  int64
	clusterID uint64
	prefix    string
	objects   *index
}

// ErrCheckpointDamaged is wrapped by every error about a checkpoint's content (as opposed to
// reading the file at all).
var ErrCheckpointDamaged = errors.New("damaged checkpoint")

func damaged(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCheckpointDamaged, fmt.Sprintf(format, args...))
}

// writeCheckpoint writes snap's object index, exact at revision rev, to path: to a temporary file
// beside it, synced, then renamed over it, so that a reader finds the old checkpoint or the new
// one, never a part. It returns the bytes written.
func writeCheckpoint(path string, snap *Snapshot, rev int64, clusterID uint64, prefix string) (int64, error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+".*.tmp")
	if err != nil {
		return 0, err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after the rename, nothing is there
	n, err := encodeCheckpoint(f, snap.objects, rev, clusterID, prefix)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, err
	}
	if err := os.Rename(tmp, path); err != nil {
		return 0, err
	}
	syncDir(dir) // the rename itself (best effort: the file is whole either way)
	return n, nil
}

// encodeCheckpoint writes the checkpoint of ix to w.
func encodeCheckpoint(w io.Writer, ix *index, rev int64, clusterID uint64, prefix string) (int64, error) {
	cw := &countingWriter{w: w, crc: crc32.New(castagnoli)}
	bw := bufio.NewWriterSize(cw, 1<<20)
	var b []byte
	b = append(b, checkpointMagic...)
	b = binary.LittleEndian.AppendUint32(b, checkpointVersion)
	b = binary.LittleEndian.AppendUint64(b, uint64(rev))
	b = binary.LittleEndian.AppendUint64(b, clusterID)
	b = appendString(b, prefix)
	// Every home the process knows: a copy in a published snapshot names one interned before it.
	var list []*Home
	if p := homes.list.Load(); p != nil {
		list = *p
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(len(list)))
	for _, h := range list {
		for _, s := range []string{h.Target, h.TargetUID, h.Bucket, h.Prefix, h.MediaType} {
			b = appendString(b, s)
		}
	}
	b = binary.LittleEndian.AppendUint64(b, uint64(ix.count))
	bw.Write(b)
	e := make([]byte, 0, entrySize)
	for s := range leafCount {
		l := ix.leaf(s)
		if l == nil || len(l.keys) == 0 {
			continue
		}
		var head [8]byte
		binary.LittleEndian.PutUint32(head[0:], uint32(s))
		binary.LittleEndian.PutUint32(head[4:], uint32(len(l.keys)))
		bw.Write(head[:])
		for i := range l.keys {
			bw.Write(appendEntry(e[:0], &l.keys[i], &l.objs[i]))
		}
	}
	var end [4]byte
	binary.LittleEndian.PutUint32(end[:], endOfLeaves)
	bw.Write(end[:])
	if err := bw.Flush(); err != nil {
		return cw.n, err
	}
	binary.LittleEndian.PutUint32(end[:], cw.crc.Sum32())
	_, err := w.Write(end[:])
	return cw.n + 4, err
}

func appendString(b []byte, s string) []byte {
	b = binary.LittleEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

func appendEntry(b []byte, k *Key, o *Object) []byte {
	b = append(b, k[:]...)
	b = binary.LittleEndian.AppendUint64(b, o.Size)
	b = binary.LittleEndian.AppendUint64(b, uint64(o.Created))
	b = binary.LittleEndian.AppendUint64(b, uint64(o.Expires))
	b = binary.LittleEndian.AppendUint64(b, uint64(o.ModRevision))
	b = binary.LittleEndian.AppendUint64(b, uint64(o.Generation))
	b = append(b, o.SHA256[:]...)
	b = append(b, o.SHA1[:]...)
	b = binary.LittleEndian.AppendUint32(b, o.CRC32C)
	b = binary.LittleEndian.AppendUint32(b, uint32(o.home))
	var flags byte
	if o.Transient {
		flags |= 1
	}
	return append(b, flags)
}

type countingWriter struct {
	w   io.Writer
	crc hash.Hash32
	n   int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.crc.Write(p[:n])
	c.n += int64(n)
	return n, err
}

// readCheckpoint reads the checkpoint at path.
func readCheckpoint(path string) (*checkpoint, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return decodeCheckpoint(bufio.NewReaderSize(f, 1<<20))
}

// decodeCheckpoint decodes a checkpoint, checking everything it says: a file that fails any
// check is refused whole. Copies are interned into the process's homes only once the whole
// file has checked out.
func decodeCheckpoint(r io.Reader) (*checkpoint, error) {
	d := &cpReader{r: r, crc: crc32.New(castagnoli)}
	var magic [8]byte
	d.read(magic[:])
	if d.err != nil || string(magic[:]) != checkpointMagic {
		return nil, damaged("not a checkpoint (no %s header)", checkpointMagic)
	}
	if v := d.u32(); d.err == nil && v != checkpointVersion {
		return nil, damaged("version %d, this release reads %d", v, checkpointVersion)
	}
	cp := &checkpoint{revision: int64(d.u64()), clusterID: d.u64(), prefix: d.string()}
	if d.err == nil && cp.revision <= 0 {
		return nil, damaged("revision %d", cp.revision)
	}
	nh := d.u32()
	if d.err == nil && nh > maxCheckpointHomes {
		return nil, damaged("%d homes", nh)
	}
	var fileHomes []Home
	for i := uint32(0); i < nh && d.err == nil; i++ {
		fileHomes = append(fileHomes, Home{Target: d.string(), TargetUID: d.string(), Bucket: d.string(), Prefix: d.string(),
			MediaType: d.string()})
	}
	count := d.u64()
	if d.err != nil {
		return nil, d.fail()
	}
	type leaf struct {
		n  int
		sh shard
	}
	var leaves []leaf
	var total uint64
	batch := make([]byte, batchEntries*entrySize)
	last := -1
	for {
		s := d.u32()
		if d.err != nil {
			return nil, d.fail()
		}
		if s == endOfLeaves {
			break
		}
		n := d.u32()
		switch {
		case d.err != nil:
			return nil, d.fail()
		case s >= leafCount || int(s) <= last:
			return nil, damaged("leaf %d after leaf %d", s, last)
		case n == 0 || uint64(n) > count-total:
			return nil, damaged("leaf %d of %d copies, %d of %d left", s, n, count-total, count)
		}
		last, total = int(s), total+uint64(n)
		c := min(int(n), batchEntries)
		sh := shard{keys: make([]Key, 0, c), objs: make([]Object, 0, c)}
		for i := uint32(0); i < n; i++ {
			if i%batchEntries == 0 { // entries are read a batch at a time
				batch = batch[:min(int(n-i), batchEntries)*entrySize]
				d.read(batch)
				if d.err != nil {
					return nil, d.fail()
				}
			}
			k, o, h := parseEntry((*[entrySize]byte)(batch[(int(i)%batchEntries)*entrySize:]))
			if int(h) >= len(fileHomes) {
				return nil, damaged("leaf %d: copy of home %d of %d", s, h, len(fileHomes))
			}
			if shardOf(k) != int(s) {
				return nil, damaged("leaf %d holds key %s of leaf %d", s, k, shardOf(k))
			}
			if j := len(sh.keys) - 1; j >= 0 {
				if c := compareKeys(sh.keys[j], k); c > 0 || c == 0 && fileHomes[sh.objs[j].home].Target >= fileHomes[h].Target {
					return nil, damaged("leaf %d is out of order at copy %d", s, i)
				}
			}
			o.home = homeID(h)
			sh.keys = append(sh.keys, k)
			sh.objs = append(sh.objs, o)
		}
		leaves = append(leaves, leaf{n: int(s), sh: sh})
	}
	if total != count {
		return nil, damaged("%d copies where the header says %d", total, count)
	}
	sum := d.crc.Sum32()
	var trailer [4]byte
	if _, err := io.ReadFull(r, trailer[:]); err != nil {
		return nil, damaged("no checksum: %v", err)
	}
	if got := binary.LittleEndian.Uint32(trailer[:]); got != sum {
		return nil, damaged("checksum %08x, content sums to %08x", got, sum)
	}
	if n, _ := io.ReadFull(r, trailer[:1]); n != 0 {
		return nil, damaged("bytes after the checksum")
	}
	// The file checked out: its homes become the process's.
	ids := make([]homeID, len(fileHomes))
	for i, h := range fileHomes {
		ids[i] = homes.intern(h)
	}
	ix := &index{count: int(count)}
	for _, l := range leaves {
		for i := range l.sh.objs {
			l.sh.objs[i].home = ids[l.sh.objs[i].home]
		}
		nd := ix.nodes[l.n/fanout]
		if nd == nil {
			nd = &node{}
			ix.nodes[l.n/fanout] = nd
		}
		sh := l.sh
		nd.leaves[l.n%fanout] = &sh
	}
	cp.objects = ix
	return cp, nil
}

func parseEntry(e *[entrySize]byte) (Key, Object, uint32) {
	var k Key
	var o Object
	b := e[:]
	copy(k[:], b[:32])
	b = b[32:]
	o.Size = binary.LittleEndian.Uint64(b)
	o.Created = int64(binary.LittleEndian.Uint64(b[8:]))
	o.Expires = int64(binary.LittleEndian.Uint64(b[16:]))
	o.ModRevision = int64(binary.LittleEndian.Uint64(b[24:]))
	o.Generation = int64(binary.LittleEndian.Uint64(b[32:]))
	b = b[40:]
	copy(o.SHA256[:], b[:32])
	copy(o.SHA1[:], b[32:52])
	b = b[52:]
	o.CRC32C = binary.LittleEndian.Uint32(b)
	h := binary.LittleEndian.Uint32(b[4:])
	o.Transient = b[8]&1 != 0
	return k, o, h
}

// cpReader reads a checkpoint's fields, summing what it reads; the first error sticks.
type cpReader struct {
	r   io.Reader
	crc hash.Hash32
	err error
}

func (d *cpReader) read(p []byte) {
	if d.err != nil {
		return
	}
	if _, err := io.ReadFull(d.r, p); err != nil {
		d.err = err
		return
	}
	d.crc.Write(p)
}

func (d *cpReader) u32() uint32 {
	var b [4]byte
	d.read(b[:])
	return binary.LittleEndian.Uint32(b[:])
}

func (d *cpReader) u64() uint64 {
	var b [8]byte
	d.read(b[:])
	return binary.LittleEndian.Uint64(b[:])
}

func (d *cpReader) string() string {
	n := d.u32()
	if d.err != nil {
		return ""
	}
	if n > maxCheckpointString {
		d.err = damaged("a string of %d bytes", n)
		return ""
	}
	b := make([]byte, n)
	d.read(b)
	return string(b)
}

// fail is the error that stopped the reader: a file that ends early is damaged.
func (d *cpReader) fail() error {
	if errors.Is(d.err, ErrCheckpointDamaged) {
		return d.err
	}
	if errors.Is(d.err, io.EOF) || errors.Is(d.err, io.ErrUnexpectedEOF) {
		return damaged("it ends early")
	}
	return d.err
}

// checkpointAge is how old a checkpoint file is, for logs.
func checkpointAge(path string) time.Duration {
	if fi, err := os.Stat(path); err == nil {
		return time.Since(fi.ModTime()).Round(time.Second)
	}
	return 0
}
