package controlplane

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/targets"
)

// CanaryName is the object the prober keeps in each target, under the target's prefix. It is not a
// content key, so the reconciler leaves it alone.
const CanaryName = ".detour-canary"

// probeState is the prober's memory of one target within one janitor term.
type probeState struct {
	uid        string
	canary     string // "bucket/name" the canary was written to, for this uid
	fails, oks int
	// wrote is the verdict this term last wrote for this uid. Only the elected janitor writes
	// verdicts, so it is the current one even before the snapshot shows it: a watch that lags a
	// probe interval does not make the prober write the same verdict again.
	wrote *pb.TargetHealth
}

// runProber probes every target each ProbeInterval until ctx ends: it keeps a small canary object
// in the target's bucket and fetches it through the target's client-facing URL (public, CDN or
// signed) the way a client follows a redirect, checking the status and the bytes. Verdicts are
// written to etcd when they change, with hysteresis (ProbeFailures to fall, ProbeRecoveries to
// rise); a target nobody has judged yet gets the first verdict at once. A target that appears
// (created, or deleted and created again) is probed as soon as the snapshot shows it, not at the
// next tick, so it is usable within one probe of its creation.
func (j *term) runProber(ctx context.Context) {
	if j.cfg.Store == nil {
		j.once.Warn("prober", "no store access: targets cannot be probed and stay unhealthy")
		return
	}
	states := map[string]*probeState{}
	tick := time.NewTicker(j.cfg.Janitor.ProbeInterval)
	defer tick.Stop()
	j.probeRound(ctx, states)
	for {
		// Checked before waiting: a target created while a round ran is in the snapshot already.
		snap := j.w.Snapshot()
		if fresh := unprobed(snap, states); len(fresh) > 0 {
			j.probeTargets(ctx, snap, states, fresh)
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			j.probeRound(ctx, states)
		case <-snap.Superseded():
		}
	}
}

// unprobed lists the snapshot's targets this prober has no state for.
func unprobed(snap *targets.Snapshot, states map[string]*probeState) []*pb.Target {
	var out []*pb.Target
	for _, t := range snap.Targets() {
		if st := states[t.Name]; st == nil || st.uid != t.Uid {
			out = append(out, t)
		}
	}
	return out
}

// probeRound probes every target and forgets the state of targets that are gone. A completed
// round is counted in detour_loop_rounds_total{loop="probe"}.
func (j *term) probeRound(ctx context.Context, states map[string]*probeState) {
	snap := j.w.Snapshot()
	j.probeTargets(ctx, snap, states, snap.Targets())
	for name := range states {
		if _, ok := snap.Target(name); !ok {
			delete(states, name)
		}
	}
	if ctx.Err() == nil {
		j.metrics.rounds.WithLabelValues(loopProbe).Inc()
	}
}

// probeTargets probes ts in parallel and judges each.
func (j *term) probeTargets(ctx context.Context, snap *targets.Snapshot, states map[string]*probeState, ts []*pb.Target) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	for _, t := range ts {
		st := states[t.Name]
		if st == nil || st.uid != t.Uid {
			st = &probeState{uid: t.Uid}
			states[t.Name] = st
		}
		wg.Add(1)
		go func(t *pb.Target, st *probeState) {
			defer wg.Done()
			err := j.probe(ctx, snap, t, st)
			mu.Lock()
			defer mu.Unlock()
			j.judge(ctx, snap, t, st, err)
		}(t, st)
	}
	wg.Wait()
}

func canaryBytes(t *pb.Target) []byte {
	return []byte(fmt.Sprintf("detour canary for target %s (uid %s)\n", t.Name, t.Uid))
}

// probe writes the canary if this term has not, then fetches it as a client would.
func (j *term) probe(ctx context.Context, snap *targets.Snapshot, t *pb.Target, st *probeState) error {
	ctx, cancel := context.WithTimeout(ctx, j.cfg.Janitor.ProbeTimeout)
	defer cancel()
	bucket, name := t.GetStore().GetBucket(), t.GetStore().GetPrefix()+CanaryName
	want := canaryBytes(t)
	if st.canary != bucket+"/"+name {
		if err := j.cfg.Store.Put(ctx, bucket, name, blob.CanaryMediaType, want); err != nil {
			return fmt.Errorf("cannot write the canary: %w", err)
		}
		st.canary = bucket + "/" + name
	}
	url, err := blob.LocationURL(t, bucket, name, j.cfg.Signer, j.cfg.Now(),
		policyDuration(snap.Policy().GetSignedUrlTtl(), targets.DefaultSignedURLTTL))
	if err != nil {
		return fmt.Errorf("cannot build a location URL: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", blob.CanaryMediaType)
	resp, err := j.probeClient.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", redactURL(url), err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, int64(len(want))+1))
	switch {
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("GET %s: HTTP %d", redactURL(url), resp.StatusCode)
	case err != nil:
		return fmt.Errorf("GET %s: %w", redactURL(url), err)
	case !bytes.Equal(body, want):
		return fmt.Errorf("GET %s: the canary's bytes differ (%d bytes)", redactURL(url), len(body))
	}
	return nil
}

// redactURL drops the query (a signed URL's signature) from a URL for logs and verdicts.
func redactURL(u string) string {
	if i := bytes.IndexByte([]byte(u), '?'); i >= 0 {
		return u[:i] + "?…"
	}
	return u
}

// judge updates a target's verdict from one probe result.
func (j *term) judge(ctx context.Context, snap *targets.Snapshot, t *pb.Target, st *probeState, err error) {
	result := "ok"
	if err != nil {
		result = "failed"
		st.fails, st.oks = st.fails+1, 0
	} else {
		st.fails, st.oks = 0, st.oks+1
	}
	j.metrics.probes.WithLabelValues(t.Name, result).Inc()
	prev, judged := snap.Health(t.Name)
	if st.wrote != nil {
		prev, judged = st.wrote, true
	}
	judged = judged && prev.TargetUid == t.Uid
	var verdict *bool
	switch {
	case !judged:
		v := err == nil
		verdict = &v
	case prev.Healthy && st.fails >= j.cfg.Janitor.ProbeFailures:
		v := false
		verdict = &v
	case !prev.Healthy && st.oks >= j.cfg.Janitor.ProbeRecoveries:
		v := true
		verdict = &v
	}
	if verdict == nil {
		return
	}
	h := &pb.TargetHealth{Target: t.Name, TargetUid: t.Uid, Healthy: *verdict, Since: timestamppb.New(j.cfg.Now())}
	if err != nil {
		h.Reason = err.Error()
	}
	wctx, cancel := context.WithTimeout(ctx, j.cfg.WriteTimeout)
	defer cancel()
	// Through the term's fenced registry: a deposed prober's verdict is refused.
	if werr := j.reg.SetHealth(wctx, h); werr != nil {
		j.once.Warn("health", "cannot record target health", "err", werr)
		return
	}
	st.wrote = h
	if h.Healthy {
		j.cfg.Log.Info("target healthy", "target", t.Name)
	} else {
		j.cfg.Log.Warn("target unhealthy: no redirects or fills until it passes again", "target", t.Name, "reason", h.Reason)
	}
}
