package controlplane

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/detourhq/detour/internal/targets"
)

// EtcdMaintenance configures how the control plane keeps etcd healthy: every replica reads etcd's
// alarms and database sizes (alarms.go), and the elected janitor compacts etcd's history and,
// where it may, defragments and recovers from the NOSPACE alarm.
type EtcdMaintenance struct {
	// CompactInterval is how often the elected janitor compacts etcd's history, each time to the
	// revision it saw one interval before (as the Kubernetes API server does): a watcher less
	// than an interval behind is never cut off, and history stays bounded by what one interval
	// writes (default 5m; negative: never, for an etcd that compacts itself).
	CompactInterval time.Duration
	// StatusInterval is how often each replica reads etcd's alarms and database sizes (default
	// 10s).
	StatusInterval time.Duration
	// Defrag lets the janitor defragment etcd's members: after a compaction, a member whose
	// database file is more than half free space (and at least DefragMinFree, default 64 MiB)
	// is defragmented; and on a NOSPACE alarm the janitor compacts to the current revision,
	// defragments, and disarms the alarm once the database fits the quota with a tenth to spare.
	// A member being defragmented answers nothing meanwhile, so this is for the embedded etcd
	// (one member, set by the control plane); a cluster's operators defragment member by member
	// (docs/deploy.md).
	Defrag        bool
	DefragMinFree int64
	// InProcess says the member runs in this process (the embedded etcd): its compaction's
	// garbage (a map of every key's kept revision, and the tree it walks) is this process's, and
	// is given back to the system after each compaction.
	InProcess bool
}

func (c *EtcdMaintenance) defaults() {
	if c.CompactInterval == 0 {
		c.CompactInterval = 5 * time.Minute
	}
	if c.StatusInterval <= 0 {
		c.StatusInterval = 10 * time.Second
	}
	if c.DefragMinFree <= 0 {
		c.DefragMinFree = 64 << 20
	}
}

// maintenanceTimeout bounds one compaction, defragmentation, status read or disarm.
const maintenanceTimeout = time.Minute

// runCompactor compacts etcd's history every CompactInterval while this replica is the janitor,
// and recovers from NOSPACE when Defrag allows it (the status loop signals k.nospace). These are
// not registry writes, so the term's fence cannot be compared in their transaction: each round
// reads etcd's revision through the fenced registry (Held), and a deposed janitor's round stops
// there.
func (t *term) runCompactor(ctx context.Context) {
	k, cli := t.etcd, t.cli
	revision := func(ctx context.Context) (int64, error) {
		rctx, cancel := context.WithTimeout(ctx, maintenanceTimeout)
		defer cancel()
		return t.reg.Held(rctx)
	}
	interval := k.cfg.CompactInterval
	var tick <-chan time.Time
	if interval > 0 {
		t := time.NewTicker(interval)
		defer t.Stop()
		tick = t.C
	}
	var seen int64 // the revision read one interval ago: what the next compaction keeps from
	if interval > 0 {
		seen, _ = revision(ctx)
	}
	var recovered time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-k.nospace:
			// Once a minute at most: a recovery that found no room is not retried every poll.
			if k.cfg.Defrag && k.isRaised(etcdserverpb.AlarmType_NOSPACE) && time.Since(recovered) > time.Minute {
				k.recoverSpace(ctx, cli, revision)
				recovered = time.Now()
			}
		case <-tick:
			rev, err := revision(ctx)
			if errors.Is(err, targets.ErrNotElected) {
				return // the term is ending: watchElection ends it
			}
			if err != nil {
				k.once.Warn("compact", "cannot read etcd's revision to compact its history; retrying", "err", err)
				continue
			}
			// The first compaction in a process walks every key, and its garbage grew an idle
			// replica by 160 MB at 1e6 records for about 12 s: in process, collected every few
			// seconds as it runs. Not under boundedWork: under Place traffic that kept the
			// collector running through the compaction, and Place's p99 went from 2–4 ms to
			// 10–22 ms (bench/RESULTS.md, "Place while a listing runs").
			compacted := false
			if seen > 0 {
				compact := func() { compacted = k.compact(ctx, cli, seen) }
				if k.cfg.InProcess {
					collectingWhile(compact)
				} else {
					compact()
				}
			}
			if compacted {
				if k.cfg.Defrag {
					k.defragFragmented(ctx, cli)
				}
				if k.cfg.InProcess {
					releaseMemory(k.log, "etcd history compacted")
				}
			}
			seen = rev
		}
	}
}

// compact removes the history before rev. A revision compacted already (by etcd's own
// auto-compaction, or a janitor before this one) is not a failure.
func (k *etcdKeeper) compact(ctx context.Context, cli *clientv3.Client, rev int64) bool {
	cctx, cancel := context.WithTimeout(ctx, maintenanceTimeout)
	defer cancel()
	// Physical: return once the history is deleted, so that a defragmentation after it gives
	// the space back.
	_, err := cli.Compact(cctx, rev, clientv3.WithCompactPhysical())
	switch {
	case errors.Is(err, rpctypes.ErrCompacted):
		k.metrics.compactions.WithLabelValues("already_compacted").Inc()
		return false
	case err != nil:
		k.metrics.compactions.WithLabelValues("failed").Inc()
		k.once.Warn("compact", "cannot compact etcd's history; it grows until the next compaction succeeds", "revision", rev, "err", err)
		return false
	}
	k.once.Recovered("compact", "etcd's history compacted again", "revision", rev)
	k.metrics.compactions.WithLabelValues("ok").Inc()
	k.metrics.compacted.Set(float64(rev))
	k.log.Debug("etcd history compacted", "revision", rev)
	return true
}

// defragFragmented defragments every member whose database file is mostly free space.
func (k *etcdKeeper) defragFragmented(ctx context.Context, cli *clientv3.Client) {
	for _, ep := range cli.Endpoints() {
		st, err := k.status(ctx, cli, ep)
		if err != nil {
			continue // the status loop reports unreachable members
		}
		if free := st.DbSize - st.DbSizeInUse; free > st.DbSize/2 && free >= k.cfg.DefragMinFree {
			_ = k.defrag(ctx, cli, ep, st.DbSize)
		}
	}
}

// defrag defragments one member and logs how much it gave back.
func (k *etcdKeeper) defrag(ctx context.Context, cli *clientv3.Client, ep string, before int64) error {
	dctx, cancel := context.WithTimeout(ctx, maintenanceTimeout)
	defer cancel()
	start := time.Now()
	m, err := k.members.maintenance(ep)
	if err == nil {
		_, err = m.Defragment(dctx, &etcdserverpb.DefragmentRequest{})
	}
	if err != nil {
		k.metrics.defrags.WithLabelValues("failed").Inc()
		k.log.Warn("cannot defragment etcd member", "endpoint", ep, "err", err)
		return fmt.Errorf("defragment %s: %w", ep, err)
	}
	k.metrics.defrags.WithLabelValues("ok").Inc()
	after := int64(-1)
	if st, err := k.status(ctx, cli, ep); err == nil {
		after = st.DbSize
		k.observe(ep, st)
	}
	k.log.Info("etcd member defragmented", "endpoint", ep, "db_size_before", before, "db_size_after", after,
		"took", time.Since(start).Round(time.Millisecond).String())
	return nil
}

func (k *etcdKeeper) status(ctx context.Context, _ *clientv3.Client, ep string) (*etcdserverpb.StatusResponse, error) {
	return k.statusTimeout(ctx, ep, maintenanceTimeout)
}

func (k *etcdKeeper) statusTimeout(ctx context.Context, ep string, d time.Duration) (*etcdserverpb.StatusResponse, error) {
	m, err := k.members.maintenance(ep)
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return m.Status(sctx, &etcdserverpb.StatusRequest{})
}

// recoverSpace answers a NOSPACE alarm: it compacts all history (a watcher behind the current
// revision re-reads, as after any compaction it missed), defragments every member, and disarms
// the alarm if the database now fits the quota with a tenth to spare. If the live data alone
// fills the quota, the alarm stays and the log says so.
func (k *etcdKeeper) recoverSpace(ctx context.Context, cli *clientv3.Client, revision func(context.Context) (int64, error)) {
	k.log.Warn("etcd NOSPACE alarm: compacting all history, defragmenting and disarming (automatic for the embedded etcd)")
	rev, err := revision(ctx)
	if errors.Is(err, targets.ErrNotElected) {
		k.log.Info("NOSPACE recovery left to the next janitor: this replica's term has ended", "err", err)
		return
	}
	if err != nil {
		k.metrics.recoveries.WithLabelValues("failed").Inc()
		k.log.Error("NOSPACE recovery: cannot read etcd's revision", "err", err)
		return
	}
	k.compact(ctx, cli, rev)
	fits := true
	for _, ep := range cli.Endpoints() {
		st, err := k.status(ctx, cli, ep)
		if err != nil {
			k.metrics.recoveries.WithLabelValues("failed").Inc()
			k.log.Error("NOSPACE recovery: cannot read the member's status", "endpoint", ep, "err", err)
			return
		}
		if err := k.defrag(ctx, cli, ep, st.DbSize); err != nil {
			k.metrics.recoveries.WithLabelValues("failed").Inc()
			return
		}
		if st, err = k.status(ctx, cli, ep); err != nil || st.DbSizeQuota <= 0 || st.DbSize > st.DbSizeQuota-st.DbSizeQuota/10 {
			fits = false
			size, quota := int64(0), int64(0)
			if st != nil {
				size, quota = st.DbSize, st.DbSizeQuota
			}
			k.log.Error("NOSPACE recovery: the live data fills the quota even after compaction and defragmentation; "+
				"raise the quota (--embedded-etcd-quota, or etcd's --quota-backend-bytes) or remove objects, then disarm the alarm",
				"endpoint", ep, "db_size", size, "quota", quota, "err", err)
		}
	}
	if !fits {
		k.metrics.recoveries.WithLabelValues("no_room").Inc()
		return
	}
	if err := disarmNoSpace(ctx, cli); err != nil {
		k.metrics.recoveries.WithLabelValues("failed").Inc()
		k.log.Error("NOSPACE recovery: cannot disarm the alarm", "err", err)
		return
	}
	k.metrics.recoveries.WithLabelValues("disarmed").Inc()
	k.log.Info("etcd NOSPACE alarm disarmed after compaction and defragmentation: writes are accepted again", "revision", rev)
	k.poll(ctx, cli) // the gauges follow at once, not at the next status read
}

// disarmNoSpace disarms the NOSPACE alarm of every member that raised it, and no other alarm (a
// CORRUPT alarm is an operator's to clear).
func disarmNoSpace(ctx context.Context, cli *clientv3.Client) error {
	actx, cancel := context.WithTimeout(ctx, maintenanceTimeout)
	defer cancel()
	list, err := cli.AlarmList(actx)
	if err != nil {
		return err
	}
	for _, a := range list.Alarms {
		if a.Alarm != etcdserverpb.AlarmType_NOSPACE {
			continue
		}
		if _, err := cli.AlarmDisarm(actx, &clientv3.AlarmMember{MemberID: a.MemberID, Alarm: a.Alarm}); err != nil {
			return fmt.Errorf("member %x: %w", a.MemberID, err)
		}
	}
	return nil
}
