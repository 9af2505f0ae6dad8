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
	DefaultFillClaimTTL = 60 * time.Second
	DefaultSignedURLTTL = 15 * time.Minute
)

// Registry writes Detour's state to etcd.
type Registry struct {
	cli    *clientv3.Client
	prefix string

	// Fill claims share leases: granting one lease per claim would double the etcd writes on the
	// Place path. A claim made at t with TTL T lives until between t+T and t+T·5/4.
	leaseMu sync.Mutex
	leases  map[time.Duration]sharedLease
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
	return &Registry{cli: cli, prefix: prefix, leases: map[time.Duration]sharedLease{}}
}

// Prefix is the registry's etcd prefix.
func (r *Registry) Prefix() string { return r.prefix }

func (r *Registry) targetKey(name string) string { return r.prefix + "targets/" + name }
func (r *Registry) aliveKey(name string) string  { return r.prefix + "alive/" + name }
func (r *Registry) fillKey(key string) string    { return r.prefix + "fills/" + key }
func (r *Registry) policyKey() string            { return r.prefix + "policy" }
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
	c.Revision, c.Healthy = 0, false
	return c
}

// CreateTarget registers a new target. It fails with ErrExists if the name is taken.
func (r *Registry) CreateTarget(ctx context.Context, t *pb.Target) (*pb.Target, error) {
	if err := ValidateTarget(t); err != nil {
		return nil, err
	}
	k := r.targetKey(t.Name)
	resp, err := r.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
		Then(clientv3.OpPut(k, marshal(storedTarget(t)))).
		Commit()
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
	return r.casTarget(ctx, t, t.Revision)
}

func (r *Registry) casTarget(ctx context.Context, t *pb.Target, rev int64) (*pb.Target, error) {
	k := r.targetKey(t.Name)
	resp, err := r.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(k), "=", rev)).
		Then(clientv3.OpPut(k, marshal(storedTarget(t)))).
		Else(clientv3.OpGet(k, clientv3.WithKeysOnly())).
		Commit()
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
	resp, err := r.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(r.targetKey(name)), ">", 0)).
		Then(clientv3.OpDelete(r.targetKey(name)), clientv3.OpDelete(r.aliveKey(name))).
		Commit()
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
	if _, err := r.cli.Put(ctx, ak, time.Now().UTC().Format(time.RFC3339), clientv3.WithLease(lease.ID)); err != nil {
		return fmt.Errorf("heartbeat %q: %w", name, err)
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
	r.leaseMu.Lock()
	defer r.leaseMu.Unlock()
	now := time.Now()
	if l, ok := r.leases[ttl]; ok && now.Sub(l.granted) < ttl/4 {
		return l.id, nil
	}
	secs := int64((ttl + ttl/4 + time.Second - 1) / time.Second)
	resp, err := r.cli.Grant(ctx, secs)
	if err != nil {
		return 0, err
	}
	r.leases[ttl] = sharedLease{id: resp.ID, granted: now}
	return resp.ID, nil
}

// Claim records c as the one fill of c.Key fleet-wide, for at least ttl (at most ttl·5/4). It
// reports false when another claim is live.
func (r *Registry) Claim(ctx context.Context, c *pb.FillClaim, ttl time.Duration) (bool, error) {
	lease, err := r.claimLease(ctx, ttl)
	if err != nil {
		return false, fmt.Errorf("claim %s: grant lease: %w", c.Key, err)
	}
	fk := r.fillKey(c.Key)
	resp, err := r.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(fk), "=", 0)).
		Then(clientv3.OpPut(fk, marshal(c), clientv3.WithLease(lease))).
		Commit()
	if err != nil {
		// The lease may be gone (etcd restored from a backup, say); the next claim grants anew.
		r.forgetLease(ttl, lease)
		return false, fmt.Errorf("claim %s: %w", c.Key, err)
	}
	return resp.Succeeded, nil
}

func (r *Registry) forgetLease(ttl time.Duration, id clientv3.LeaseID) {
	r.leaseMu.Lock()
	defer r.leaseMu.Unlock()
	if r.leases[ttl].id == id {
		delete(r.leases, ttl)
	}
}

// heldClaim reads the claim on key and checks its token.
func (r *Registry) heldClaim(ctx context.Context, key, token string) (*pb.FillClaim, int64, error) {
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
// claim's revision: a claim that expired or was taken over makes the report fail.
func (r *Registry) CompleteFill(ctx context.Context, obj *pb.StoredObject, token string) (*pb.StoredObject, error) {
	c, rev, err := r.heldClaim(ctx, obj.Key, token)
	if err != nil {
		return nil, err
	}
	if c.Target != obj.Target {
		return nil, invalid("target", "%q is not the claimed target %q", obj.Target, c.Target)
	}
	if obj.ObjectName == "" {
		obj.ObjectName = c.ObjectName
	}
	obj.State = pb.ObjectState_OBJECT_STATE_READY
	fk := r.fillKey(obj.Key)
	resp, err := r.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(fk), "=", rev)).
		Then(clientv3.OpPut(r.objectKey(obj.Key, obj.Target), marshal(obj)), clientv3.OpDelete(fk)).
		Commit()
	if err != nil {
		return nil, fmt.Errorf("report fill %s: %w", obj.Key, err)
	}
	if !resp.Succeeded {
		return nil, fmt.Errorf("report fill %s: %w", obj.Key, ErrClaimNotHeld)
	}
	return obj, nil
}

// AbortFill releases a claim held with token.
func (r *Registry) AbortFill(ctx context.Context, key, token string) error {
	_, rev, err := r.heldClaim(ctx, key, token)
	if err != nil {
		return err
	}
	fk := r.fillKey(key)
	resp, err := r.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(fk), "=", rev)).Then(clientv3.OpDelete(fk)).Commit()
	if err != nil {
		return fmt.Errorf("abort fill %s: %w", key, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("abort fill %s: %w", key, ErrClaimNotHeld)
	}
	return nil
}

// DeleteObjects removes every copy of key from the index. It returns how many and the revision.
func (r *Registry) DeleteObjects(ctx context.Context, key string) (int64, int64, error) {
	resp, err := r.cli.Delete(ctx, r.prefix+"objects/"+key+"/", clientv3.WithPrefix())
	if err != nil {
		return 0, 0, fmt.Errorf("delete objects %s: %w", key, err)
	}
	return resp.Deleted, resp.Header.Revision, nil
}

// DeleteObjectAt removes one copy if it is still at revision rev (the sweeper's delete).
func (r *Registry) DeleteObjectAt(ctx context.Context, key, target string, rev int64) (bool, error) {
	k := r.objectKey(key, target)
	resp, err := r.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(k), "=", rev)).Then(clientv3.OpDelete(k)).Commit()
	if err != nil {
		return false, fmt.Errorf("delete object %s at %s: %w", key, target, err)
	}
	return resp.Succeeded, nil
}

// PutObject writes an object record directly (tests, imports). Fills go through CompleteFill.
func (r *Registry) PutObject(ctx context.Context, obj *pb.StoredObject) error {
	if err := ValidateKey("key", obj.Key); err != nil {
		return err
	}
	if _, err := r.cli.Put(ctx, r.objectKey(obj.Key, obj.Target), marshal(obj)); err != nil {
		return fmt.Errorf("put object %s: %w", obj.Key, err)
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
	resp, err := r.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(k), "=", p.Revision)).
		Then(clientv3.OpPut(k, marshal(stored))).
		Commit()
	if err != nil {
		return nil, fmt.Errorf("set policy: %w", err)
	}
	if !resp.Succeeded {
		return nil, fmt.Errorf("set policy at revision %d: %w", p.Revision, ErrConflict)
	}
	stored.Revision = resp.Header.Revision
	return stored, nil
}

// NewObject builds the record of a completed fill.
func NewObject(key, target, objectName, mediaType string, size uint64, sha256, sha1 []byte, now time.Time, ttl time.Duration) *pb.StoredObject {
	o := &pb.StoredObject{Key: key, Target: target, State: pb.ObjectState_OBJECT_STATE_READY, Size: size,
		MediaType: mediaType, Sha256: sha256, Sha1: sha1, Created: timestamppb.New(now), ObjectName: objectName}
	if ttl > 0 {
		o.Expires = timestamppb.New(now.Add(ttl))
	}
	return o
}
