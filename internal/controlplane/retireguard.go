package controlplane

import (
	"errors"
	"math"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Two rounds retire the records a listing of a target's bucket does not show: the elected
// janitor's reconcile (sweep.go) and each replica's confirmation of a target after its start
// (storeguard.go). A listing can be wrong and still end without an error: a wrong prefix, a bucket
// emptied by mistake or being restored, a store or emulator answering an empty page. On its word
// alone a round would retire every record it misses at once, and the confirmation would queue their
// bytes for deletion too. So a round that would retire more than a share of the target's servable
// records (JanitorConfig.MaxRetireShare, --reconcile-max-retire-share) retires none: it logs
// once why and what to do, counts detour_reconcile_refused_total{target,path}, and the alert
// DetourReconcileRefusedMassRetirement fires. Records whose objects really went away are still
// found one at a time: by bucket notifications, agents' location reports and, on a replica whose
// confirmation was refused, the check of each record before its first redirect.
//
// Completeness is the listing's: blob.Store.List returns nil only when the store answered every
// page; a page that fails ends the round with an error, before anything is retired.

// DefaultMaxRetireShare is the share of a target's records one round may retire by default.
const DefaultMaxRetireShare = 0.1

// retireFloor is how many records a round may always retire, whatever the share: one object
// deleted among a handful is retired at the next round.
const retireFloor = 3

// Paths of detour_reconcile_refused_total.
const (
	retirePathReconcile = "reconcile"
	retirePathConfirm   = "confirm"
	retirePathOrphans   = "orphans"
)

// The reconcile's other deletion has the mirror-image failure: stored objects that no record
// accounts for are deleted as the bytes of failed fills, on the index's word. An index that lost
// its records (an etcd restored from an old backup or started empty, a wrong --etcd-prefix, a
// target pointed at another deployment's bucket) would make every object in the bucket such an
// orphan. So a round that would delete more orphans than the same share of the objects it listed
// deletes none, counted under path "orphans" and logged once, like a refused retirement.

// allowOrphanDeletion says whether a reconcile of target t that would delete would of the listed
// objects it saw as orphans may go ahead.
func (d *deps) allowOrphanDeletion(t *pb.Target, would, listed int) bool {
	cause := "orphans-refused:" + t.Name
	share := d.cfg.Janitor.MaxRetireShare
	allowed := retireAllowed(share, listed)
	refused := d.metrics.retireRefused.WithLabelValues(t.Name, retirePathOrphans)
	if would <= allowed {
		d.once.Recovered(cause, "the reconcile deletes a target's orphaned objects again", "target", t.Name,
			"would_delete", would, "listed", listed)
		return true
	}
	refused.Inc()
	d.once.Warn(cause, "a listing of the target's bucket shows more objects that no record accounts for than one round may delete; none deleted. "+
		"Check that this control plane's etcd (and --etcd-prefix) holds the target's records: a restored or new etcd, or a target "+
		"pointed at another deployment's bucket, looks like this. If the objects are garbage, raise --reconcile-max-retire-share "+
		"(1 turns the check off) for one round",
		"target", t.Name, "bucket", t.GetStore().GetBucket(), "prefix", t.GetStore().GetPrefix(),
		"would_delete", would, "listed", listed, "max_retire_share", share, "allowed", allowed)
	return false
}

// errRetirementRefused ends a round whose listing would retire too many records at once.
var errRetirementRefused = errors.New("refused to retire more than the allowed share of the target's records in one round")

// retireAllowed is how many of servable records one round may retire with share (≥ 1: all).
func retireAllowed(share float64, servable int) int {
	if share >= 1 {
		return servable
	}
	return max(retireFloor, int(math.Floor(share*float64(servable))))
}

// allowRetirement says whether a round on path (retirePathReconcile, retirePathConfirm) that would
// retire would of target t's servable records may go ahead. A refusal is counted and logged once
// until a round of the same path and target is allowed again (which is logged too).
func (d *deps) allowRetirement(t *pb.Target, path string, would, servable int) bool {
	cause := "retire-refused:" + path + ":" + t.Name
	share := d.cfg.Janitor.MaxRetireShare
	allowed := retireAllowed(share, servable)
	refused := d.metrics.retireRefused.WithLabelValues(t.Name, path) // at 0 from the first round: increase() sees the first refusal
	if would <= allowed {
		d.once.Recovered(cause, "a listing of the target's bucket retires its missing records again",
			"target", t.Name, "path", path, "would_retire", would, "records", servable)
		return true
	}
	refused.Inc()
	d.once.Warn(cause, "a listing of the target's bucket misses more of its records than one round may retire; none retired. "+
		"Check that the target's bucket and prefix are right and hold its objects; if they were deleted on purpose, "+
		"raise --reconcile-max-retire-share (1 turns the check off) for one round",
		"target", t.Name, "bucket", t.GetStore().GetBucket(), "prefix", t.GetStore().GetPrefix(), "path", path,
		"would_retire", would, "records", servable, "max_retire_share", share, "allowed", allowed)
	return false
}
