package targets

import (
	"context"
	"errors"
	"fmt"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Fence is an election a writer holds: the key its campaign created in etcd and that key's create
// revision (concurrency.Election's Key and Rev). A registry fenced by it writes only while the key
// still exists at that revision: the fence is compared in the same transaction as the write, so a
// writer that has lost the election (its session expired, its key was deleted, another replica
// won) writes nothing, even before it has noticed.
type Fence struct {
	Key      string
	Revision int64
}

// ErrNotElected means a fenced write was refused: its writer no longer holds the election.
var ErrNotElected = errors.New("no longer elected: the election key is gone or was created again")

// Fenced returns a registry over the same etcd client and prefix whose every write also requires f
// to hold. It never groups claims (grouped transactions are shared with unfenced callers).
func (r *Registry) Fenced(f Fence) *Registry {
	return &Registry{cli: r.cli, prefix: r.prefix, leases: r.leases, fence: &f, enc: r.enc}
}

// txn commits If(cmps).Then(then).Else(els). In a fenced registry the transaction is nested in one
// that compares the fence: a failed fence is ErrNotElected, told apart from the caller's own
// compares failing (Succeeded false, the Else branch's responses).
func (r *Registry) txn(ctx context.Context, cmps []clientv3.Cmp, then, els []clientv3.Op) (*clientv3.TxnResponse, error) {
	if r.fence == nil {
		return r.cli.Txn(ctx).If(cmps...).Then(then...).Else(els...).Commit()
	}
	resp, err := r.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(r.fence.Key), "=", r.fence.Revision)).
		Then(clientv3.OpTxn(cmps, then, els)).
		Commit()
	if err != nil {
		return nil, err
	}
	if !resp.Succeeded {
		return nil, fmt.Errorf("%w (%s at revision %d)", ErrNotElected, r.fence.Key, r.fence.Revision)
	}
	inner := resp.Responses[0].GetResponseTxn()
	return (*clientv3.TxnResponse)(&etcdserverpb.TxnResponse{Header: resp.Header, Succeeded: inner.GetSucceeded(),
		Responses: inner.GetResponses()}), nil
}

// Held returns etcd's current revision if the registry's fence still holds, and ErrNotElected if
// it does not (an unfenced registry always holds). It is for the elected writer's work that is
// not a write of the registry's and so cannot be compared in the same transaction (compacting
// etcd's history, say): checked just before it, the work is done by a deposed writer only in the
// moment between the check and the work.
func (r *Registry) Held(ctx context.Context) (int64, error) {
	if r.fence == nil {
		// Any key does: the header carries the store's revision.
		resp, err := r.cli.Get(ctx, r.prefix, clientv3.WithCountOnly())
		if err != nil {
			return 0, err
		}
		return resp.Header.Revision, nil
	}
	resp, err := r.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(r.fence.Key), "=", r.fence.Revision)).Commit()
	if err != nil {
		return 0, err
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("%w (%s at revision %d)", ErrNotElected, r.fence.Key, r.fence.Revision)
	}
	return resp.Header.Revision, nil
}
