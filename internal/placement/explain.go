package placement

import (
	"fmt"
	"sort"
)

// Trace is how a decision came about: every copy and every accepted target with what placement
// made of it, and the steps in words. Explain builds it beside Decide, which stays free of it.
type Trace struct {
	Copies  []TracedCopy   // in the order given
	Targets []TracedTarget // the accepted targets, in client order (duplicates once)
	Steps   []string
}

// TracedCopy is one copy of the key: kept as a redirect candidate, or dropped and why. Kept copies
// carry their rank (1: chosen) and the ranking's fields, most significant first.
type TracedCopy struct {
	Copy       Copy
	Region     string
	Kept       bool
	Dropped    string
	Rank       int
	Draining   bool
	Remote     bool
	Preference int // index in the policy's region preference; len+1 when absent
	Score      float64
}

// TracedTarget is one accepted target as a fill candidate: kept (with its rendezvous score and
// where its region comes in the fill order) or dropped and why.
type TracedTarget struct {
	Name        string
	Region      string
	Kept        bool
	Dropped     string
	Score       float64
	RegionOrder int // 0: the agent's region, then the policy's preference in order, then (last) any other region
}

// Explain answers req exactly as Decide does and traces why. It costs what Decide costs several
// times over: it is for operators, never the request path.
func Explain(targets map[string]Target, copies []Copy, p Policy, req Request) (Decision, Trace) {
	d := Decide(targets, copies, p, req)
	var tr Trace
	step := func(format string, args ...any) { tr.Steps = append(tr.Steps, fmt.Sprintf(format, args...)) }
	step("key %s, agent region %q, client accepts %v, size hint %d", req.Key, req.Region, req.Accepted, req.SizeHint)

	// Copies: the redirect candidates.
	var kept []int
	for _, c := range copies {
		tc := TracedCopy{Copy: c}
		t, known := targets[c.Target]
		tc.Region = t.Region
		switch {
		case !c.Expires.IsZero() && !req.Now.Before(c.Expires):
			tc.Dropped = "expired at " + c.Expires.UTC().Format("2006-01-02T15:04:05Z")
		case !known:
			tc.Dropped = "unknown target"
		case !accepts(req.Accepted, c.Target):
			tc.Dropped = "not accepted by the client"
		default:
			tc.Dropped = unusableWhy(t)
		}
		if tc.Dropped == "" {
			tc.Kept, tc.Draining, tc.Remote = true, t.State == Draining, t.Region != req.Region
			tc.Preference, tc.Score = preference(p, t.Region), Score(req.Key, t.Name, t.Weight)
			kept = append(kept, len(tr.Copies))
		}
		tr.Copies = append(tr.Copies, tc)
	}
	sort.SliceStable(kept, func(i, j int) bool { return tr.Copies[kept[i]].before(tr.Copies[kept[j]]) })
	for r, i := range kept {
		tr.Copies[i].Rank = r + 1
	}
	step("%d READY copies, %d kept as redirect candidates", len(copies), len(kept))
	for _, c := range tr.Copies {
		if !c.Kept {
			step("  copy at %s dropped: %s", c.Copy.Target, c.Dropped)
		}
	}
	if len(kept) > 0 {
		step("ranked by: not draining, in the agent's region, the policy's region preference %v, rendezvous score", p.RegionPreference)
		for _, i := range kept {
			c := tr.Copies[i]
			step("  #%d %s (region %s): draining=%v remote=%v preference=%d score=%.6g", c.Rank, c.Copy.Target, c.Region,
				c.Draining, c.Remote, c.Preference, c.Score)
		}
		best := tr.Copies[kept[0]]
		if d.Reason == ReasonBelowMinSize {
			step("best copy %s is %d bytes, under min_redirect_bytes %d: inline", best.Copy.Target, best.Copy.Size, p.MinRedirectBytes)
		} else {
			step("redirect to %s (%d bytes)", d.Copy.Target, d.Copy.Size)
		}
		return d, tr
	}

	// A miss: the fill candidates.
	if d.Reason == ReasonBelowMinSize {
		step("no copy; size hint %d is under min_redirect_bytes %d: inline, no fill", req.SizeHint, p.MinRedirectBytes)
		return d, tr
	}
	order := fillOrder(p, req.Region)
	seen := map[string]bool{}
	for _, name := range req.Accepted {
		if seen[name] {
			continue
		}
		seen[name] = true
		tt := TracedTarget{Name: name}
		t, known := targets[name]
		tt.Region = t.Region
		switch {
		case !known:
			tt.Dropped = "unknown target"
		case unusableWhy(t) != "":
			tt.Dropped = unusableWhy(t)
		case t.State == Draining:
			tt.Dropped = "draining: gets no fills"
		default:
			tt.Kept, tt.Score = true, Score(req.Key, name, t.Weight)
			tt.RegionOrder = len(order)
			if i, ok := order[t.Region]; ok {
				tt.RegionOrder = i
			}
		}
		tr.Targets = append(tr.Targets, tt)
	}
	step("no copy to redirect to; fill candidates among the accepted targets, by region (the agent's, then the policy's preference, then any other) and rendezvous score:")
	for _, t := range tr.Targets {
		if t.Kept {
			step("  %s (region %s): region order %d, score %.6g", t.Name, t.Region, t.RegionOrder, t.Score)
		} else {
			step("  %s dropped: %s", t.Name, t.Dropped)
		}
	}
	switch {
	case d.Fill != "" && d.Reason == ReasonFillRemote:
		step("no fillable target in region %q: fill at %s in region %s (cross-region)", req.Region, d.Fill, targets[d.Fill].Region)
	case d.Fill != "":
		step("fill at %s, in the agent's region", d.Fill)
	case d.Reason == ReasonCrossRegionForbidden:
		step("only other regions could be filled, and the policy forbids cross-region fills: inline, no fill")
	default:
		step("inline, no fill: %s", d.Reason)
	}
	return d, tr
}

// before orders kept copies the way Decide ranks them.
func (a TracedCopy) before(b TracedCopy) bool {
	switch {
	case a.Draining != b.Draining:
		return !a.Draining
	case a.Remote != b.Remote:
		return !a.Remote
	case a.Preference != b.Preference:
		return a.Preference < b.Preference
	case a.Score != b.Score:
		return a.Score > b.Score
	}
	return a.Copy.Target < b.Copy.Target
}

func accepts(accepted []string, name string) bool {
	for _, a := range accepted {
		if a == name {
			return true
		}
	}
	return false
}

// unusableWhy says why t may serve nothing ("" if it may).
func unusableWhy(t Target) string {
	switch {
	case !t.Healthy:
		return "unhealthy"
	case t.State == Disabled:
		return "disabled"
	case t.Weight == 0:
		return "weight 0"
	}
	return ""
}

func preference(p Policy, region string) int {
	for i, r := range p.RegionPreference {
		if r == region {
			return i
		}
	}
	return len(p.RegionPreference) + 1
}

// fillOrder numbers the regions a fill tries in turn: the agent's (0), then the policy's
// preference; a region it does not name comes after all of them.
func fillOrder(p Policy, region string) map[string]int {
	order := map[string]int{region: 0}
	for _, r := range p.RegionPreference {
		if _, ok := order[r]; !ok {
			order[r] = len(order)
		}
	}
	return order
}
