package controlplane

import (
	"context"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/detourhq/detour/internal/logonce"
)

// etcdKeeper is what the control plane knows and does about etcd's own health: alarms and
// database sizes read by every replica (runEtcdStatus), compaction, defragmentation and NOSPACE
// recovery by the elected janitor (runCompactor).
type etcdKeeper struct {
	cfg     EtcdMaintenance
	log     *slog.Logger
	once    *logonce.Set
	metrics etcdMetrics
	// nospace tells the janitor's loop that the NOSPACE alarm is raised (buffered: one signal
	// waits, more are dropped).
	nospace chan struct{}

	// members reach one member each, for the calls that name a member (Status, Defragment).
	members memberClients

	mu     sync.Mutex
	raised map[string]bool // alarms raised at the last read
}

// memberClients are etcd clients of one endpoint each. The shared client's own per-member calls
// (Status, Defragment) dial the member while its endpoint auto-sync may rewrite the endpoints:
// a data race inside clientv3 3.7.
type memberClients struct {
	base clientv3.Config // of the shared client: TLS and credentials
	mu   sync.Mutex
	byEP map[string]*clientv3.Client
}

// reach sets the configuration (TLS, credentials) the member clients are made from: the shared
// client's. It is called before any member is reached.
func (m *memberClients) reach(base clientv3.Config) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.base = base
}

// maintenance returns the Maintenance API of the member at ep, connecting on first use.
func (m *memberClients) maintenance(ep string) (etcdserverpb.MaintenanceClient, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, ok := m.byEP[ep]
	if !ok {
		cfg := m.base
		cfg.Endpoints, cfg.AutoSyncInterval = []string{ep}, 0
		if cfg.DialTimeout == 0 {
			cfg.DialTimeout = 5 * time.Second
		}
		var err error
		if c, err = clientv3.New(cfg); err != nil {
			return nil, err
		}
		if m.byEP == nil {
			m.byEP = map[string]*clientv3.Client{}
		}
		m.byEP[ep] = c
	}
	return etcdserverpb.NewMaintenanceClient(c.ActiveConnection()), nil
}

func (m *memberClients) close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for ep, c := range m.byEP {
		c.Close()
		delete(m.byEP, ep)
	}
}

type etcdMetrics struct {
	alarm       *prometheus.GaugeVec
	dbSize      *prometheus.GaugeVec
	dbInUse     *prometheus.GaugeVec
	dbQuota     *prometheus.GaugeVec
	compactions *prometheus.CounterVec
	compacted   prometheus.Gauge
	defrags     *prometheus.CounterVec
	recoveries  *prometheus.CounterVec
}

// watchedAlarms are exported even while not raised, so that an alert can tell 0 from absent.
var watchedAlarms = []etcdserverpb.AlarmType{etcdserverpb.AlarmType_NOSPACE, etcdserverpb.AlarmType_CORRUPT}

func newEtcdKeeper(cfg EtcdMaintenance, reg *prometheus.Registry, once *logonce.Set, log *slog.Logger) *etcdKeeper {
	cfg.defaults()
	k := &etcdKeeper{cfg: cfg, log: log, once: once, nospace: make(chan struct{}, 1), raised: map[string]bool{}}
	m := &k.metrics
	m.alarm = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "detour_etcd_alarm",
		Help: "1 while etcd has the alarm raised on any member (NOSPACE: the database reached its space quota and writes are refused; CORRUPT), else 0."},
		[]string{"alarm"})
	m.dbSize = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "detour_etcd_db_size_bytes",
		Help: "Size of the etcd member's database file, which the space quota is checked against."}, []string{"endpoint"})
	m.dbInUse = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "detour_etcd_db_size_in_use_bytes",
		Help: "Bytes of the etcd member's database file in use; the rest is free space a defragmentation gives back."}, []string{"endpoint"})
	m.dbQuota = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "detour_etcd_db_quota_bytes",
		Help: "The etcd member's backend space quota."}, []string{"endpoint"})
	m.compactions = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_etcd_compactions_total",
		Help: "Compactions of etcd's history by the elected janitor, by outcome (ok, already_compacted, failed)."}, []string{"outcome"})
	m.compacted = prometheus.NewGauge(prometheus.GaugeOpts{Name: "detour_etcd_compacted_revision",
		Help: "The revision this replica last compacted etcd's history to (0: none yet)."})
	m.defrags = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_etcd_defrags_total",
		Help: "Defragmentations of etcd members by the elected janitor (embedded etcd), by outcome (ok, failed)."}, []string{"outcome"})
	m.recoveries = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_etcd_nospace_recoveries_total",
		Help: "Automatic recoveries from the NOSPACE alarm (embedded etcd), by outcome (disarmed, no_room, failed)."}, []string{"outcome"})
	for _, a := range watchedAlarms {
		m.alarm.WithLabelValues(a.String()).Set(0)
	}
	for _, o := range []string{"ok", "already_compacted", "failed"} {
		m.compactions.WithLabelValues(o)
	}
	reg.MustRegister(m.alarm, m.dbSize, m.dbInUse, m.dbQuota, m.compactions, m.compacted, m.defrags, m.recoveries)
	return k
}

// runEtcdStatus reads etcd's alarms and its members' database sizes every StatusInterval until
// ctx ends. Every replica runs it, so each one's metrics tell its own view.
func (d *deps) runEtcdStatus(ctx context.Context, cli *clientv3.Client) {
	d.every(ctx, loopEtcdStatus, d.etcd.cfg.StatusInterval, nil, func(ctx context.Context) { d.etcd.poll(ctx, cli) })
}

// poll reads the alarms and sizes once, logs each alarm once when it is raised and once when it
// is cleared, and tells the janitor's loop about NOSPACE.
func (k *etcdKeeper) poll(ctx context.Context, cli *clientv3.Client) {
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	list, err := cli.AlarmList(actx)
	cancel()
	if err != nil {
		// The watcher reports an unreachable etcd; the gauges keep their last reading.
		k.log.Debug("cannot read etcd's alarms", "err", err)
		return
	}
	members := map[string][]string{}
	for _, a := range list.Alarms {
		name := a.Alarm.String()
		members[name] = append(members[name], strconv.FormatUint(a.MemberID, 16))
	}
	sizes := k.sizes(ctx, cli)
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, a := range watchedAlarms {
		if _, ok := members[a.String()]; !ok {
			k.metrics.alarm.WithLabelValues(a.String()).Set(0)
		}
	}
	for name, ids := range members {
		k.metrics.alarm.WithLabelValues(name).Set(1)
		if !k.raised[name] {
			k.once.Warn("etcd-alarm:"+name, alarmMessage(name), "alarm", name, "members", strings.Join(ids, ","), "db_size", sizes)
		}
	}
	for name := range k.raised {
		if _, ok := members[name]; !ok {
			k.once.Recovered("etcd-alarm:"+name, "etcd alarm cleared", "alarm", name)
		}
	}
	k.raised = map[string]bool{}
	for name := range members {
		k.raised[name] = true
	}
	if _, ok := members[etcdserverpb.AlarmType_NOSPACE.String()]; ok {
		select {
		case k.nospace <- struct{}{}:
		default:
		}
	}
}

func alarmMessage(name string) string {
	switch name {
	case etcdserverpb.AlarmType_NOSPACE.String():
		return "etcd raised the NOSPACE alarm: its database reached the space quota, and it refuses every write " +
			"(fills, admin changes) until space is reclaimed and the alarm disarmed; Place answers inline meanwhile. " +
			"Recovery: docs/deploy.md, section 'etcd out of space'"
	case etcdserverpb.AlarmType_CORRUPT.String():
		return "etcd raised the CORRUPT alarm: a member's data differs from the others'; restore that member from a snapshot"
	}
	return "etcd raised an alarm"
}

// sizes reads every endpoint's database sizes into the gauges and returns them by endpoint.
func (k *etcdKeeper) sizes(ctx context.Context, cli *clientv3.Client) map[string]int64 {
	out := map[string]int64{}
	eps := slices.Clone(cli.Endpoints())
	for _, ep := range eps {
		st, err := k.statusTimeout(ctx, ep, 5*time.Second)
		if err != nil {
			continue
		}
		k.observe(ep, st)
		out[ep] = st.DbSize
	}
	return out
}

// isRaised reports whether the alarm was raised at the last read.
func (k *etcdKeeper) isRaised(a etcdserverpb.AlarmType) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.raised[a.String()]
}

func (k *etcdKeeper) observe(ep string, st *etcdserverpb.StatusResponse) {
	k.metrics.dbSize.WithLabelValues(ep).Set(float64(st.DbSize))
	k.metrics.dbInUse.WithLabelValues(ep).Set(float64(st.DbSizeInUse))
	k.metrics.dbQuota.WithLabelValues(ep).Set(float64(st.DbSizeQuota))
}
