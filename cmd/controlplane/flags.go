package main

import (
	"time"

	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/controlplane"
	"github.com/detourhq/detour/internal/flagcheck"
)

// checkOptions refuses, naming the flag, the values the control plane cannot work with: floats
// that are not numbers, shares outside their range, intervals so short that probes time out or
// loops spin, rates so low that nothing passes, sizes past what memory or etcd holds; and it
// normalises --gcs-endpoint as STORAGE_EMULATOR_HOST is read (blob.NormalizeEndpoint). Zero keeps
// each default, except --reconcile-max-retire-share's (a share of 0 would be read as meant).
func checkOptions(o *controlplane.Options) error {
	j := o.Janitor
	ep, epErr := blob.NormalizeEndpoint(o.GCSEndpoint)
	if epErr != nil {
		epErr = &flagcheck.Error{Flag: "gcs-endpoint", Msg: epErr.Error()}
	} else {
		o.GCSEndpoint = ep
	}
	retireShare := flagcheck.Fraction("reconcile-max-retire-share", j.MaxRetireShare)
	if retireShare == nil && j.MaxRetireShare == 0 {
		retireShare = &flagcheck.Error{Flag: "reconcile-max-retire-share", Msg: "0 is not a share above 0 and at most 1 (1 turns the check off)"}
	}
	compact := error(nil)
	if o.Etcd.CompactInterval > 0 {
		compact = flagcheck.Duration("compact-interval", o.Etcd.CompactInterval, time.Second, 24*time.Hour, false)
	}
	return flagcheck.All(
		epErr,
		flagcheck.Rate("claim-rate", o.ClaimRate, 1, "0: default 100; negative: unbounded"),
		flagcheck.Int("claim-burst", int64(o.ClaimBurst), 1, 1<<20, true),
		flagcheck.Int("claims-in-flight", int64(max(o.ClaimsInFlight, 0)), 0, 64, true),
		flagcheck.Rate("copy-rate", j.CopyRate, 0.01, ""),
		flagcheck.Duration("probe-interval", j.ProbeInterval, 100*time.Millisecond, time.Hour, true),
		flagcheck.Int("probe-failures", int64(j.ProbeFailures), 1, 100, true),
		flagcheck.Int("probe-recoveries", int64(j.ProbeRecoveries), 1, 100, true),
		flagcheck.Duration("sweep-interval", j.SweepInterval, 100*time.Millisecond, 24*time.Hour, true),
		flagcheck.Duration("reconcile-interval", j.ReconcileInterval, time.Second, 7*24*time.Hour, true),
		retireShare,
		flagcheck.Int("garbage-batch", int64(j.GarbageBatch), 1, 100000, true),
		flagcheck.Duration("garbage-grace", j.GarbageGrace, time.Second, 24*time.Hour, true),
		flagcheck.Duration("copy-interval", j.CopyInterval, 100*time.Millisecond, time.Hour, true),
		flagcheck.Int("hot-keys", int64(j.HotKeys), 1, 10_000_000, true),
		flagcheck.Duration("redirect-cache-max-age", max(o.RedirectCacheMaxAge, 0), time.Second, 24*time.Hour, true),
		flagcheck.Duration("agent-lag-threshold", o.AgentLagThreshold, time.Second, 24*time.Hour, true),
		flagcheck.Int("embedded-etcd-quota", o.EmbeddedEtcdQuota, 16<<20, 8<<30, true),
		compact,
		flagcheck.Duration("checkpoint-interval", max(o.CheckpointInterval, 0), 10*time.Second, 24*time.Hour, true),
		flagcheck.Int("gc-percent", int64(o.GCPercent), 10, 1000, true),
	)
}
