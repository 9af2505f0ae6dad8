// Package targets is Detour's registry on etcd: target registrations, heartbeat liveness, stored
// objects, fill claims and policy, and a watcher that keeps an immutable in-memory snapshot of all
// of it current. Every write is an etcd transaction that compares a revision first; nothing is
// read, modified and written back without a compare. It decides no placement.
package targets

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Errors callers branch on.
var (
	ErrNotFound     = errors.New("not found")
	ErrExists       = errors.New("already exists")
	ErrConflict     = errors.New("revision conflict: the stored value changed since it was read")
	ErrClaimNotHeld = errors.New("fill claim is not held with this token (expired, aborted or taken over)")
	ErrNotHeartbeat = errors.New("target does not heartbeat")
)

// DefaultPrefix is where Detour keeps its state in etcd.
const DefaultPrefix = "/detour/v1/"

// Defaults of the policy when none is stored or a field is zero.
const (
	DefaultFillClaimTTL             = 60 * time.Second
	DefaultSignedURLTTL             = 15 * time.Minute
	DefaultCrossRegionCopyThreshold = 10
	DefaultCrossRegionCopyWindow    = 10 * time.Minute
	DefaultMinOccurrences           = 2
	DefaultAdmissionWindow          = 10 * time.Minute
)

// Registry writes Detour's state to etcd.
type Registry struct {
	cli    *clientv3.Client
	prefix string

	// Fill claims share leases: granting one lease per claim would double the etcd writes on the
	// Place path. A claim made at t with TTL T lives until between t+T and t+T·5/4.
	leases *leasePool
	// claims groups concurrent claims into shared transactions (nil: one each; see GroupClaims).
	claims *claimGroup
	// fence, when set, guards every write (see Fenced).
	fence *Fence
	// enc is how object records are written (read: both encodings, always).
	enc RecordEncoding
}

// leasePool holds the shared leases, by TTL; a registry and its fenced views share one.
type leasePool struct {
	mu sync.Mutex
	m  map[time.Duration]sharedLease
}

type sharedLease struct {
	id      clientv3.LeaseID
	granted time.Time
}

// NewRegistry returns a registry that keeps its keys under prefix (DefaultPrefix if empty).
func NewRegistry(cli *clientv3.Client, prefix string) *Registry {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	return &Registry{cli: cli, prefix: prefix, leases: &leasePool{m: map[time.Duration]sharedLease{}}}
}

// SetRecordEncoding sets how object records are written (default EncodingHomeRef). Call it before
// the registry is used.
func (r *Registry) SetRecordEncoding(enc RecordEncoding) { r.enc = enc }

// objectPut is the write of o's record, and the home record it names (nil if none), which must be
// written in the same transaction, before it (homeOp).
func (r *Registry) objectPut(o *pb.StoredObject) (clientv3.Op, *homeRecord) {
	v, h := encodeRecord(o, r.enc)
	return clientv3.OpPut(r.objectKey(o.Key, o.Target), string(v)), h
}

// homeOp writes h unless etcd holds it as it is: a home deleted or changed behind Detour's back
// is put back by the next record that names it. A transaction holds it at most once (etcd refuses
// two puts of one key in one transaction).
func (r *Registry) homeOp(h *homeRecord) clientv3.Op {
	k, v := r.homeKey(h.ref), string(h.value)
	return clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.Value(k), "=", v)}, nil, []clientv3.Op{clientv3.OpPut(k, v)})
}

// objectOps are the operations that write o's record, its home first.
func (r *Registry) objectOps(o *pb.StoredObject) []clientv3.Op {
	put, h := r.objectPut(o)
	if h == nil {
		return []clientv3.Op{put}
	}
	return []clientv3.Op{r.homeOp(h), put}
}

// Prefix is the registry's etcd prefix.
func (r *Registry) Prefix() string { return r.prefix }

func (r *Registry) targetKey(name string) string { return r.prefix + "targets/" + name }
func (r *Registry) aliveKey(name string) string  { return r.prefix + "alive/" + name }
func (r *Registry) healthKey(name string) string { return r.prefix + "health/" + name }
func (r *Registry) fillKey(key string) string    { return r.prefix + "fills/" + key }
func (r *Registry) policyKey() string            { return r.prefix + "policy" }
func (r *Registry) garbageKey(id string) string  { return r.prefix + "garbage/" + id }
func (r *Registry) copyKey(id string) string     { return r.prefix + "copies/" + id }
func (r *Registry) homeKey(ref homeRef) string   { return r.prefix + "homes/" + ref.String() }
func (r *Registry) objectKey(key, target string) string {
	return r.prefix + "objects/" + key + "/" + target
}

func marshal(m proto.Message) string {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		// Only messages this package built reach here; a failure is a programming error.
		panic(fmt.Sprintf("marshal %T: %v", m, err))
	}
	return string(b)
}

// storedTarget strips the fields the server computes.
func storedTarget(t *pb.Target) *pb.Target {
	c := proto.Clone(t).(*pb.Target)
	c.Revision, c.Healthy, c.UnhealthyReason, c.Warnings = 0, false, "", nil
	return c
}

// CreateTarget registers a new target. It fails with ErrExists if the name is taken.
func (r *Registry) CreateTarget(ctx context.Context, t *pb.Target) (*pb.Target, error) {
	if err := ValidateTarget(t); err != nil {
		return nil, err
	}
	k := r.targetKey(t.Name)
	// A new uid every time: records of a deleted target of the same name never apply to this one.
	t = proto.Clone(t).(*pb.Target)
	t.Uid = NewToken()
	resp, err := r.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(k), "=", 0)},
		[]clientv3.Op{clientv3.OpPut(k, marshal(storedTarget(t)))}, nil)
	if err != nil {
		return nil, fmt.Errorf("create target %q: %w", t.Name, err)
	}
	if !resp.Succeeded {
		return nil, fmt.Errorf("create target %q: %w", t.Name, ErrExists)
	}
	out := proto.Clone(t).(*pb.Target)
	out.Revision = resp.Header.Revision
	return out, nil
}

// UpdateTarget replaces a target if its stored mod revision equals t.Revision.
func (r *Registry) UpdateTarget(ctx context.Context, t *pb.Target) (*pb.Target, error) {
	if err := ValidateTarget(t); err != nil {
		return nil, err
	}
	if t.Revision <= 0 {
		return nil, invalid("target.revision", "is required for an update (the revision that was read)")
	}
	cur, err := r.GetTarget(ctx, t.Name)
	if err != nil {
		return nil, err
	}
	if cur.Revision != t.Revision {
		return nil, fmt.Errorf("update target %q at revision %d: %w", t.Name, t.Revision, ErrConflict)
	}
	// The uid is the server's: an update keeps the target's identity, whatever the caller sent.
	t = proto.Clone(t).(*pb.Target)
	t.Uid = cur.Uid
	return r.casTarget(ctx, t, t.Revision)
}

func (r *Registry) casTarget(ctx context.Context, t *pb.Target, rev int64) (*pb.Target, error) {
	k := r.targetKey(t.Name)
	resp, err := r.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(k), "=", rev)},
		[]clientv3.Op{clientv3.OpPut(k, marshal(storedTarget(t)))},
		[]clientv3.Op{clientv3.OpGet(k, clientv3.WithKeysOnly())})
	if err != nil {
		return nil, fmt.Errorf("update target %q: %w", t.Name, err)
	}
	if !resp.Succeeded {
		if len(resp.Responses) > 0 && len(resp.Responses[0].GetResponseRange().Kvs) == 0 {
			return nil, fmt.Errorf("update target %q: %w", t.Name, ErrNotFound)
		}
		return nil, fmt.Errorf("update target %q at revision %d: %w", t.Name, rev, ErrConflict)
	}
	out := proto.Clone(t).(*pb.Target)
	out.Revision = resp.Header.Revision
	return out, nil
}

// GetTarget reads a target from etcd (linearizable).
func (r *Registry) GetTarget(ctx context.Context, name string) (*pb.Target, error) {
	resp, err := r.cli.Get(ctx, r.targetKey(name))
	if err != nil {
		return nil, fmt.Errorf("get target %q: %w", name, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, fmt.Errorf("target %q: %w", name, ErrNotFound)
	}
	t := &pb.Target{}
	if err := proto.Unmarshal(resp.Kvs[0].Value, t); err != nil {
		return nil, fmt.Errorf("target %q: stored value: %w", name, err)
	}
	t.Revision = resp.Kvs[0].ModRevision
	return t, nil
}

// SetState changes a target's state, comparing on the revision it read. Concurrent writers make
// it retry a few times rather than fail an operator's drain.
func (r *Registry) SetState(ctx context.Context, name string, state pb.TargetState) (*pb.Target, error) {
	if state == pb.TargetState_TARGET_STATE_UNSPECIFIED || pb.TargetState_name[int32(state)] == "" {
		return nil, invalid("state", "%d is not ACTIVE, DRAINING or DISABLED", state)
	}
	for attempt := 0; ; attempt++ {
		t, err := r.GetTarget(ctx, name)
		if err != nil {
			return nil, err
		}
		t.State = state
		out, err := r.casTarget(ctx, t, t.Revision)
		if errors.Is(err, ErrConflict) && attempt < 5 {
			continue
		}
		return out, err
	}
}

// DeleteTarget removes a target and its liveness key. Its objects stay in the index until they
// expire or are purged; placement ignores copies at unknown targets.
func (r *Registry) DeleteTarget(ctx context.Context, name string) (int64, error) {
	resp, err := r.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(r.targetKey(name)), ">", 0)},
		[]clientv3.Op{clientv3.OpDelete(r.targetKey(name)), clientv3.OpDelete(r.aliveKey(name))}, nil)
	if err != nil {
		return 0, fmt.Errorf("delete target %q: %w", name, err)
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("delete target %q: %w", name, ErrNotFound)
	}
	return resp.Header.Revision, nil
}

// Heartbeat keeps a heartbeat target alive for ttl: it refreshes the lease behind its liveness key,
// or grants a new one when that lease has expired. Any replica can serve any heartbeat.
func (r *Registry) Heartbeat(ctx context.Context, name string, ttl time.Duration) error {
	t, err := r.GetTarget(ctx, name)
	if err != nil {
		return err
	}
	if !t.Heartbeat {
		return fmt.Errorf("heartbeat %q: %w", name, ErrNotHeartbeat)
	}
	ak := r.aliveKey(name)
	resp, err := r.cli.Get(ctx, ak)
	if err != nil {
		return fmt.Errorf("heartbeat %q: %w", name, err)
	}
	if len(resp.Kvs) == 1 && resp.Kvs[0].Lease != 0 {
		if _, err := r.cli.KeepAliveOnce(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err == nil {
			return nil
		}
	}
	lease, err := r.cli.Grant(ctx, int64((ttl+time.Second-1)/time.Second))
	if err != nil {
		return fmt.Errorf("heartbeat %q: grant lease: %w", name, err)
	}
	// Like every write: only if the target is still the one read (not deleted, not changed to
	// stop heartbeating in between).
	tk := r.targetKey(name)
	resp2, err := r.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(tk), "=", t.Revision)},
		[]clientv3.Op{clientv3.OpPut(ak, time.Now().UTC().Format(time.RFC3339), clientv3.WithLease(lease.ID))}, nil)
	if err != nil {
		return fmt.Errorf("heartbeat %q: %w", name, outcomeUnknown(err))
	}
	if !resp2.Succeeded {
		_, _ = r.cli.Revoke(ctx, lease.ID)
		return fmt.Errorf("heartbeat %q: %w", name, ErrConflict)
	}
	return nil
}

// NewToken returns a random fill token.
func NewToken() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b[:])
}

// claimLease returns a lease that outlives now+ttl by at most ttl/4, granting one when the
// current lease for ttl is too old to give a claim its full ttl.
func (r *Registry) claimLease(ctx context.Context, ttl time.Duration) (clientv3.LeaseID, error) {
	r.leases.mu.Lock()
	defer r.leases.mu.Unlock()
	now := time.Now()
	if l, ok := r.leases.m[ttl]; ok && now.Sub(l.granted) < ttl/4 {
		return l.id, nil
	}
	secs := int64((ttl + ttl/4 + time.Second - 1) / time.Second)
	resp, err := r.cli.Grant(ctx, secs)
	if err != nil {
		return 0, err
	}
	r.leases.m[ttl] = sharedLease{id: resp.ID, granted: now}
	return resp.ID, nil
}

// Claim records c as the one fill of c.Key fleet-wide, for at least ttl (at most ttl·5/4). It
// reports false when another claim is live.
func (r *Registry) Claim(ctx context.Context, c *pb.FillClaim, ttl time.Duration) (bool, error) {
	lease, err := r.claimLease(ctx, ttl)
	if err != nil {
		return false, fmt.Errorf("claim %s: grant lease: %w", c.Key, err)
	}
	if r.claims != nil {
		return r.claims.claim(ctx, c, ttl, lease)
	}
	fk := r.fillKey(c.Key)
	resp, err := r.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(fk), "=", 0)},
		[]clientv3.Op{clientv3.OpPut(fk, marshal(c), clientv3.WithLease(lease))}, nil)
	if err != nil {
		// The lease may be gone (etcd restored from a backup, say); the next claim grants anew.
		r.forgetLease(ttl, lease)
		return false, fmt.Errorf("claim %s: %w", c.Key, outcomeUnknown(err))
	}
	return resp.Succeeded, nil
}

func (r *Registry) forgetLease(ttl time.Duration, id clientv3.LeaseID) {
	r.leases.mu.Lock()
	defer r.leases.mu.Unlock()
	if r.leases.m[ttl].id == id {
		delete(r.leases.m, ttl)
	}
}

// HeldClaim reads the claim on key (linearizably) and checks its token. It returns the claim and its
// mod revision, which CompleteFill and ReleaseClaim compare on.
func (r *Registry) HeldClaim(ctx context.Context, key, token string) (*pb.FillClaim, int64, error) {
	resp, err := r.cli.Get(ctx, r.fillKey(key))
	if err != nil {
		return nil, 0, fmt.Errorf("read claim %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, fmt.Errorf("key %s: %w", key, ErrClaimNotHeld)
	}
	c := &pb.FillClaim{}
	if err := proto.Unmarshal(resp.Kvs[0].Value, c); err != nil {
		return nil, 0, fmt.Errorf("claim %s: stored value: %w", key, err)
	}
	if c.Token != token {
		return nil, 0, fmt.Errorf("key %s: %w", key, ErrClaimNotHeld)
	}
	return c, resp.Kvs[0].ModRevision, nil
}

// CompleteFill records obj as READY and releases the claim, in one transaction that compares the
// claim's revision (from HeldClaim): a claim that expired or was taken over makes the report fail.
// The caller has checked obj against the claim and the store.
func (r *Registry) CompleteFill(ctx context.Context, obj *pb.StoredObject, claimRev int64) (int64, error) {
	obj.State = pb.ObjectState_OBJECT_STATE_READY
	fk := r.fillKey(obj.Key)
	resp, err := r.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(fk), "=", claimRev)},
		append(r.objectOps(obj), clientv3.OpDelete(fk)), nil)
	if err != nil {
		return 0, fmt.Errorf("report fill %s: %w", obj.Key, outcomeUnknown(err))
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("report fill %s: %w", obj.Key, ErrClaimNotHeld)
	}
	return resp.Header.Revision, nil
}

// ReleaseClaim deletes the claim at claimRev and, when garbage is given, queues the bytes the fill
// may have left for deletion, in one transaction. A rejected report uses it, so the key can be
// filled again at once.
func (r *Registry) ReleaseClaim(ctx context.Context, key string, claimRev int64, garbage *pb.GarbageObject) error {
	fk := r.fillKey(key)
	ops := []clientv3.Op{clientv3.OpDelete(fk)}
	if garbage != nil {
		ops = append(ops, r.garbageOp(garbage))
	}
	resp, err := r.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(fk), "=", claimRev)}, ops, nil)
	if err != nil {
		return fmt.Errorf("release claim %s: %w", key, outcomeUnknown(err))
	}
	if !resp.Succeeded {
		return fmt.Errorf("release claim %s: %w", key, ErrClaimNotHeld)
	}
	return nil
}

// AbortFill releases a claim held with token.
func (r *Registry) AbortFill(ctx context.Context, key, token string) error {
	_, rev, err := r.HeldClaim(ctx, key, token)
	if err != nil {
		return err
	}
	return r.ReleaseClaim(ctx, key, rev, nil)
}

// Retirement is one object record to remove, at the mod revision it was read at, with the stored
// bytes to delete once it is gone.
type Retirement struct {
	Key, Target string
	ModRevision int64
	Garbage     *pb.GarbageObject
}

// maxCASPerTxn keeps a transaction under etcd's default limit of 128 operations.
const maxCASPerTxn = 60

// guarded is one write that happens only if key is still at rev.
type guarded struct {
	key string
	rev int64
	ops []clientv3.Op
	// home, if set, is written before ops, once per transaction.
	home *homeRecord
}

// writeEach applies guarded writes in batches of one transaction each; a batch in which some key
// moved is retried one write at a time, so writes whose key moved are skipped and the rest
// happen. It returns how many happened and the last revision written.
func (r *Registry) writeEach(ctx context.Context, what string, ws []guarded) (int, int64, error) {
	done, rev := 0, int64(0)
	for len(ws) > 0 {
		batch := ws[:min(len(ws), maxCASPerTxn)]
		ws = ws[len(batch):]
		ok, brev, err := r.writeBatch(ctx, what, batch)
		if err != nil {
			return done, rev, err
		}
		if ok {
			done, rev = done+len(batch), brev
			continue
		}
		for _, one := range batch {
			ok, brev, err := r.writeBatch(ctx, what, []guarded{one})
			if err != nil {
				return done, rev, err
			}
			if ok {
				done, rev = done+1, brev
			}
		}
	}
	return done, rev, nil
}

func (r *Registry) writeBatch(ctx context.Context, what string, batch []guarded) (bool, int64, error) {
	var cmps []clientv3.Cmp
	var ops, homeOps []clientv3.Op
	var homes map[homeRef]bool
	for _, w := range batch {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(w.key), "=", w.rev))
		ops = append(ops, w.ops...)
		if h := w.home; h != nil && !homes[h.ref] {
			if homes == nil {
				homes = map[homeRef]bool{}
			}
			homes[h.ref] = true
			homeOps = append(homeOps, r.homeOp(h))
		}
	}
	ops = append(homeOps, ops...)
	resp, err := r.txn(ctx, cmps, ops, nil)
	if err != nil {
		return false, 0, fmt.Errorf("%s (%d records): %w", what, len(batch), outcomeUnknown(err))
	}
	return resp.Succeeded, resp.Header.Revision, nil
}

// Retire removes object records and queues their bytes for deletion, each record only if it is
// still at the revision it was read at (so a newer fill is never removed). It returns how many
// were removed.
func (r *Registry) Retire(ctx context.Context, rs []Retirement) (int, error) {
	n, _, err := r.writeEach(ctx, "retire objects", r.retirements(rs))
	return n, err
}

func (r *Registry) retirements(rs []Retirement) []guarded {
	ws := make([]guarded, len(rs))
	for i, x := range rs {
		k := r.objectKey(x.Key, x.Target)
		ws[i] = guarded{key: k, rev: x.ModRevision, ops: []clientv3.Op{clientv3.OpDelete(k)}}
		if x.Garbage != nil {
			ws[i].ops = append(ws[i].ops, r.garbageOp(x.Garbage))
		}
	}
	return ws
}

// ReadObjects reads every stored copy of key (linearizably).
func (r *Registry) ReadObjects(ctx context.Context, key string) ([]*pb.StoredObject, []int64, error) {
	recs, err := r.readRecords(ctx, key)
	if err != nil {
		return nil, nil, err
	}
	objs, revs := make([]*pb.StoredObject, len(recs)), make([]int64, len(recs))
	for i, rec := range recs {
		if rec.err != nil {
			return nil, nil, fmt.Errorf("object %s at %s: stored value: %w", key, rec.target, rec.err)
		}
		objs[i], revs[i] = rec.obj, rec.rev
	}
	return objs, revs, nil
}

// storedRecord is one record of a key as readRecords found it: decoded, or why it is not.
type storedRecord struct {
	target string
	rev    int64
	obj    *pb.StoredObject
	err    error
}

// readRecords reads every record of key and decodes each, reading each home they name once, at
// the same revision. Only a failure to read etcd is an error; a record that does not decode says
// why in its err.
func (r *Registry) readRecords(ctx context.Context, key string) ([]storedRecord, error) {
	objPrefix := r.prefix + "objects/" + key + "/"
	resp, err := r.cli.Get(ctx, objPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read objects %s: %w", key, err)
	}
	homes := map[homeRef]*sharedHome{}
	var homeErr error
	home := func(ref homeRef) (*sharedHome, bool) {
		h, seen := homes[ref]
		if !seen {
			h, homeErr = r.readHome(ctx, ref, resp.Header.Revision)
			homes[ref] = h
		}
		return h, h != nil
	}
	recs := make([]storedRecord, len(resp.Kvs))
	for i, kv := range resp.Kvs {
		target := strings.TrimPrefix(string(kv.Key), objPrefix)
		o, err := decodeStored(key, target, kv.Value, home)
		if homeErr != nil {
			return nil, homeErr
		}
		recs[i] = storedRecord{target: target, rev: kv.ModRevision, obj: o, err: err}
	}
	return recs, nil
}

// HoldsRecord reports whether etcd holds a record of key at target, whether this release can read
// it or not (a newer one's format), now.
func (r *Registry) HoldsRecord(ctx context.Context, key, target string) (bool, error) {
	resp, err := r.cli.Get(ctx, r.objectKey(key, target), clientv3.WithCountOnly())
	if err != nil {
		return false, fmt.Errorf("read object %s at %s: %w", key, target, err)
	}
	return resp.Count > 0, nil
}

// purgeable are the retirements of every record of key, with the garbage of those it can read.
func (r *Registry) purgeable(ctx context.Context, key, reason string, now time.Time) ([]Retirement, error) {
	recs, err := r.readRecords(ctx, key)
	if err != nil {
		return nil, err
	}
	rs := make([]Retirement, len(recs))
	for i, rec := range recs {
		rs[i] = Retirement{Key: key, Target: rec.target, ModRevision: rec.rev}
		if rec.err == nil {
			rs[i].Garbage = GarbageOf(rec.obj, reason, now)
		}
	}
	return rs, nil
}

// readHome reads the home record ref at rev: nil if etcd holds none, or none that is ref's.
func (r *Registry) readHome(ctx context.Context, ref homeRef, rev int64) (*sharedHome, error) {
	resp, err := r.cli.Get(ctx, r.homeKey(ref), clientv3.WithRev(rev))
	if err != nil {
		return nil, fmt.Errorf("read home %s: %w", ref, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, nil
	}
	h, err := decodeHome(ref, resp.Kvs[0].Value)
	if err != nil {
		return nil, nil
	}
	return &h, nil
}

// DeleteObjects removes every copy of key from the index and queues the stored bytes for deletion.
// It returns how many copies were removed. A record it cannot read (malformed, another release's
// format, a home that is not stored) is removed too, without queueing bytes it cannot locate: the
// reconciler deletes those as orphans once no record names them.
func (r *Registry) DeleteObjects(ctx context.Context, key, reason string, now time.Time) (int64, int64, error) {
	for attempt := 0; ; attempt++ {
		rs, err := r.purgeable(ctx, key, reason, now)
		if err != nil {
			return 0, 0, err
		}
		if len(rs) == 0 {
			return 0, 0, nil
		}
		// All copies in one transaction: a purge removes every copy or, if one moved, retries.
		ok, rev, err := r.writeBatch(ctx, "delete objects", r.retirements(rs))
		if err != nil {
			return 0, 0, err
		}
		if ok {
			return int64(len(rs)), rev, nil
		}
		if attempt >= 5 {
			return 0, 0, fmt.Errorf("delete objects %s: %w", key, ErrConflict)
		}
	}
}

// PutObject writes an object record directly, unverified: tests and benchmarks only. Fills go
// through HeldClaim, a verification against the store, and CompleteFill.
func (r *Registry) PutObject(ctx context.Context, obj *pb.StoredObject) error {
	if err := ValidateKey("key", obj.Key); err != nil {
		return err
	}
	if _, err := r.txn(ctx, nil, r.objectOps(obj), nil); err != nil {
		return fmt.Errorf("put object %s: %w", obj.Key, err)
	}
	return nil
}

// GarbageOf is the garbage entry for a stored object's bytes.
func GarbageOf(o *pb.StoredObject, reason string, now time.Time) *pb.GarbageObject {
	return &pb.GarbageObject{Bucket: o.Bucket, ObjectName: o.ObjectName, Generation: o.Generation, Target: o.Target,
		Reason: reason, Queued: timestamppb.New(now)}
}

func (r *Registry) garbageOp(g *pb.GarbageObject) clientv3.Op {
	return clientv3.OpPut(r.garbageKey(NewToken()), marshal(g))
}

// QueueGarbage queues stored bytes for deletion.
func (r *Registry) QueueGarbage(ctx context.Context, g *pb.GarbageObject) error {
	if _, err := r.txn(ctx, nil, []clientv3.Op{r.garbageOp(g)}, nil); err != nil {
		return fmt.Errorf("queue garbage %s/%s: %w", g.Bucket, g.ObjectName, outcomeUnknown(err))
	}
	return nil
}

// GarbageEntry is one queued deletion.
type GarbageEntry struct {
	ID          string
	ModRevision int64
	Object      *pb.GarbageObject
}

// ListGarbage returns up to limit queued deletions.
func (r *Registry) ListGarbage(ctx context.Context, limit int64) ([]GarbageEntry, error) {
	resp, err := r.cli.Get(ctx, r.prefix+"garbage/", clientv3.WithPrefix(), clientv3.WithLimit(limit))
	if err != nil {
		return nil, fmt.Errorf("list garbage: %w", err)
	}
	out := make([]GarbageEntry, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		g := &pb.GarbageObject{}
		if err := proto.Unmarshal(kv.Value, g); err != nil {
			return nil, fmt.Errorf("garbage %s: stored value: %w", kv.Key, err)
		}
		out = append(out, GarbageEntry{ID: strings.TrimPrefix(string(kv.Key), r.prefix+"garbage/"), ModRevision: kv.ModRevision, Object: g})
	}
	return out, nil
}

// GarbageDone removes queued deletions whose bytes are gone.
func (r *Registry) GarbageDone(ctx context.Context, ids []string) error {
	for len(ids) > 0 {
		batch := ids[:min(len(ids), 100)]
		ids = ids[len(batch):]
		ops := make([]clientv3.Op, len(batch))
		for i, id := range batch {
			ops[i] = clientv3.OpDelete(r.garbageKey(id))
		}
		if _, err := r.txn(ctx, nil, ops, nil); err != nil {
			return fmt.Errorf("garbage done: %w", outcomeUnknown(err))
		}
	}
	return nil
}

// Extension moves one object's expiry, if the record is still at ModRevision.
type Extension struct {
	Object      *pb.StoredObject
	ModRevision int64
}

// Extend writes new expiries, in batches; records that moved since they were read are skipped.
// It returns how many were extended.
func (r *Registry) Extend(ctx context.Context, xs []Extension) (int, error) {
	ws := make([]guarded, len(xs))
	for i, x := range xs {
		put, h := r.objectPut(x.Object)
		ws[i] = guarded{key: r.objectKey(x.Object.Key, x.Object.Target), rev: x.ModRevision, ops: []clientv3.Op{put}, home: h}
	}
	n, _, err := r.writeEach(ctx, "extend objects", ws)
	return n, err
}

// CopyID names a copy request: region/key.
func CopyID(region, key string) string { return region + "/" + key }

// QueueCopy asks for a copy of req.Key in req.Region unless that copy is already asked for, for
// at least ttl (at most ttl·5/4: requests share leases like claims). It reports whether this call
// queued it. The caller has validated the key and the region.
func (r *Registry) QueueCopy(ctx context.Context, req *pb.CopyRequest, ttl time.Duration) (bool, error) {
	lease, err := r.claimLease(ctx, ttl)
	if err != nil {
		return false, fmt.Errorf("queue copy of %s to %s: grant lease: %w", req.Key, req.Region, err)
	}
	k := r.copyKey(CopyID(req.Region, req.Key))
	resp, err := r.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(k), "=", 0)},
		[]clientv3.Op{clientv3.OpPut(k, marshal(req), clientv3.WithLease(lease))}, nil)
	if err != nil {
		r.forgetLease(ttl, lease)
		return false, fmt.Errorf("queue copy of %s to %s: %w", req.Key, req.Region, outcomeUnknown(err))
	}
	return resp.Succeeded, nil
}

// CopyEntry is one queued copy request.
type CopyEntry struct {
	ID          string
	ModRevision int64
	Request     *pb.CopyRequest
}

// ListCopyRequests returns up to limit queued copy requests, oldest first.
func (r *Registry) ListCopyRequests(ctx context.Context, limit int64) ([]CopyEntry, error) {
	resp, err := r.cli.Get(ctx, r.copyKey(""), clientv3.WithPrefix(), clientv3.WithLimit(limit),
		clientv3.WithSort(clientv3.SortByModRevision, clientv3.SortAscend))
	if err != nil {
		return nil, fmt.Errorf("list copy requests: %w", err)
	}
	out := make([]CopyEntry, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		q := &pb.CopyRequest{}
		if err := proto.Unmarshal(kv.Value, q); err != nil {
			return nil, fmt.Errorf("copy request %s: stored value: %w", kv.Key, err)
		}
		out = append(out, CopyEntry{ID: strings.TrimPrefix(string(kv.Key), r.copyKey("")), ModRevision: kv.ModRevision, Request: q})
	}
	return out, nil
}

// CopyRequestsDone removes copy requests, each only if it is still the one that was read.
func (r *Registry) CopyRequestsDone(ctx context.Context, es []CopyEntry) error {
	ws := make([]guarded, len(es))
	for i, e := range es {
		k := r.copyKey(e.ID)
		ws[i] = guarded{key: k, rev: e.ModRevision, ops: []clientv3.Op{clientv3.OpDelete(k)}}
	}
	_, _, err := r.writeEach(ctx, "copy requests done", ws)
	return err
}

// SetHealth records the prober's verdict on a target. Only the elected prober writes it, through a
// registry fenced by its election (see Fenced): a deposed prober's verdict is refused.
func (r *Registry) SetHealth(ctx context.Context, h *pb.TargetHealth) error {
	if _, err := r.txn(ctx, nil, []clientv3.Op{clientv3.OpPut(r.healthKey(h.Target), marshal(h))}, nil); err != nil {
		return fmt.Errorf("set health of %q: %w", h.Target, outcomeUnknown(err))
	}
	return nil
}

// SetPolicy replaces the policy if its stored revision equals p.Revision (0: none stored yet).
func (r *Registry) SetPolicy(ctx context.Context, p *pb.Policy) (*pb.Policy, error) {
	if err := ValidatePolicy(p); err != nil {
		return nil, err
	}
	stored := proto.Clone(p).(*pb.Policy)
	stored.Revision = 0
	k := r.policyKey()
	resp, err := r.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(k), "=", p.Revision)},
		[]clientv3.Op{clientv3.OpPut(k, marshal(stored))}, nil)
	if err != nil {
		return nil, fmt.Errorf("set policy: %w", err)
	}
	if !resp.Succeeded {
		return nil, fmt.Errorf("set policy at revision %d: %w", p.Revision, ErrConflict)
	}
	stored.Revision = resp.Header.Revision
	return stored, nil
}

// ErrOutcomeUnknown marks a write whose outcome is unknown: etcd did not answer in time, and the
// transaction may or may not have committed. Every Detour write compares a revision, so retrying
// one is safe.
var ErrOutcomeUnknown = errors.New("outcome unknown (the write may have committed)")

// outcomeUnknown marks deadline and transport errors of a write.
func outcomeUnknown(err error) error {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("%w: %w", ErrOutcomeUnknown, err)
	}
	return err
}
