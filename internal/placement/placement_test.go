package placement

import (
	"fmt"
	"math"
	"testing"
	"time"
)

var now = time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)

func fleet(ts ...Target) map[string]Target {
	m := map[string]Target{}
	for _, t := range ts {
		if t.Weight == 0 {
			t.Weight = 1
		}
		t.Healthy = true
		m[t.Name] = t
	}
	return m
}

func names(m map[string]Target) []string {
	var out []string
	for n := range m {
		out = append(out, n)
	}
	return out
}

func TestDecide(t *testing.T) {
	targets := fleet(
		Target{Name: "us-a", Region: "us"},
		Target{Name: "us-b", Region: "us"},
		Target{Name: "eu-a", Region: "eu"},
		Target{Name: "eu-drain", Region: "eu", State: Draining},
		Target{Name: "us-off", Region: "us", State: Disabled},
	)
	sick := targets["us-b"]
	sick.Healthy = false
	withSick := fleet(targets["us-a"], targets["eu-a"])
	withSick["us-b"] = sick
	all := []string{"us-a", "us-b", "eu-a", "eu-drain", "us-off"}
	pol := Policy{MinRedirectBytes: 100, RegionPreference: []string{"eu", "us"}}
	cases := []struct {
		name    string
		targets map[string]Target
		copies  []Copy
		req     Request
		want    Decision
	}{
		{"local copy wins over remote", targets,
			[]Copy{{Target: "eu-a", Size: 500}, {Target: "us-a", Size: 500}},
			Request{Key: "k", Accepted: all, Region: "us"},
			Decision{Result: Redirect, Reason: ReasonReady, Copy: Copy{Target: "us-a", Size: 500}}},
		{"copy at a target the client does not accept is ignored", targets,
			[]Copy{{Target: "us-a", Size: 500}},
			Request{Key: "k", Accepted: []string{"eu-a"}, Region: "us"},
			Decision{Result: Inline, Reason: ReasonFillRemote, Fill: "eu-a"}},
		{"draining copy only when no other copy", targets,
			[]Copy{{Target: "eu-drain", Size: 500}, {Target: "us-a", Size: 500}},
			Request{Key: "k", Accepted: all, Region: "eu"},
			Decision{Result: Redirect, Reason: ReasonReady, Copy: Copy{Target: "us-a", Size: 500}}},
		{"draining copy when it is the only one", targets,
			[]Copy{{Target: "eu-drain", Size: 500}},
			Request{Key: "k", Accepted: all, Region: "eu"},
			Decision{Result: Redirect, Reason: ReasonReady, Copy: Copy{Target: "eu-drain", Size: 500}}},
		{"disabled copy is never used", targets,
			[]Copy{{Target: "us-off", Size: 500}},
			Request{Key: "k", Accepted: []string{"us-off"}, Region: "us"},
			Decision{Result: Inline, Reason: ReasonNoCandidates}},
		{"unhealthy copy is never used", withSick,
			[]Copy{{Target: "us-b", Size: 500}},
			Request{Key: "k", Accepted: []string{"us-b", "eu-a"}, Region: "eu"},
			Decision{Result: Inline, Reason: ReasonFill, Fill: "eu-a"}},
		{"expired copy is a miss", targets,
			[]Copy{{Target: "us-a", Size: 500, Expires: now}},
			Request{Key: "k", Accepted: []string{"us-a"}, Region: "us", Now: now},
			Decision{Result: Inline, Reason: ReasonFill, Fill: "us-a"}},
		{"copy not yet expired", targets,
			[]Copy{{Target: "us-a", Size: 500, Expires: now.Add(time.Second)}},
			Request{Key: "k", Accepted: []string{"us-a"}, Region: "us", Now: now},
			Decision{Result: Redirect, Reason: ReasonReady, Copy: Copy{Target: "us-a", Size: 500, Expires: now.Add(time.Second)}}},
		{"small copy stays inline", targets,
			[]Copy{{Target: "us-a", Size: 99}},
			Request{Key: "k", Accepted: all, Region: "us"},
			Decision{Result: Inline, Reason: ReasonBelowMinSize}},
		{"small size hint gets no fill", targets, nil,
			Request{Key: "k", Accepted: all, Region: "us", SizeHint: 10},
			Decision{Result: Inline, Reason: ReasonBelowMinSize}},
		{"no accepted targets", targets, nil,
			Request{Key: "k", Region: "us"},
			Decision{Result: Inline, Reason: ReasonNoCandidates}},
		{"unknown accepted targets", targets, nil,
			Request{Key: "k", Accepted: []string{"nope"}, Region: "us"},
			Decision{Result: Inline, Reason: ReasonNoCandidates}},
		{"draining target gets no fill", targets, nil,
			Request{Key: "k", Accepted: []string{"eu-drain"}, Region: "eu"},
			Decision{Result: Inline, Reason: ReasonNoFillTarget}},
		{"fill prefers the agent's region", targets, nil,
			Request{Key: "k", Accepted: []string{"eu-a", "us-a"}, Region: "us"},
			Decision{Result: Inline, Reason: ReasonFill, Fill: "us-a"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.req.Now.IsZero() {
				c.req.Now = now
			}
			got := Decide(c.targets, c.copies, pol, c.req)
			if got != c.want {
				t.Fatalf("got %+v\nwant %+v", got, c.want)
			}
		})
	}
}

func TestRegionPreferenceOrdersRemoteCopies(t *testing.T) {
	targets := fleet(Target{Name: "ap", Region: "ap"}, Target{Name: "eu", Region: "eu"}, Target{Name: "sa", Region: "sa"})
	copies := []Copy{{Target: "ap", Size: 1}, {Target: "eu", Size: 1}, {Target: "sa", Size: 1}}
	for _, pref := range [][]string{{"eu", "ap"}, {"sa"}, {"ap", "eu", "sa"}} {
		for i := range 50 {
			d := Decide(targets, copies, Policy{RegionPreference: pref},
				Request{Key: fmt.Sprint(i), Accepted: names(targets), Region: "us", Now: now})
			if d.Copy.Target != pref[0] {
				t.Fatalf("preference %v: key %d went to %s", pref, i, d.Copy.Target)
			}
		}
	}
}

func fillShares(targets map[string]Target, keys int) map[string]int {
	counts := map[string]int{}
	acc := names(targets)
	for i := range keys {
		d := Decide(targets, nil, Policy{}, Request{Key: fmt.Sprintf("key-%d", i), Accepted: acc, Region: "r", Now: now})
		counts[d.Fill]++
	}
	return counts
}

func TestDecideIsDeterministic(t *testing.T) {
	targets := fleet(Target{Name: "a", Region: "r"}, Target{Name: "b", Region: "r"}, Target{Name: "c", Region: "r", Weight: 3})
	acc := names(targets)
	for i := range 1000 {
		req := Request{Key: fmt.Sprintf("k%d", i), Accepted: acc, Region: "r", Now: now}
		first := Decide(targets, nil, Policy{}, req)
		// Client order must not matter for the fill choice.
		rev := append([]string(nil), acc...)
		for l, r := 0, len(rev)-1; l < r; l, r = l+1, r-1 {
			rev[l], rev[r] = rev[r], rev[l]
		}
		req.Accepted = rev
		if again := Decide(targets, nil, Policy{}, req); again != first {
			t.Fatalf("key %d: %+v then %+v", i, first, again)
		}
	}
}

func TestRemovingOneOfNMovesAboutOneNth(t *testing.T) {
	const n, keys = 10, 100000
	targets := map[string]Target{}
	for i := range n {
		targets[fmt.Sprintf("t%d", i)] = Target{Name: fmt.Sprintf("t%d", i), Region: "r", Weight: 1, Healthy: true}
	}
	before := make([]string, keys)
	acc := names(targets)
	for i := range keys {
		before[i] = Decide(targets, nil, Policy{}, Request{Key: fmt.Sprint(i), Accepted: acc, Region: "r"}).Fill
	}
	delete(targets, "t3")
	moved := 0
	for i := range keys {
		after := Decide(targets, nil, Policy{}, Request{Key: fmt.Sprint(i), Accepted: acc, Region: "r"}).Fill
		if after != before[i] {
			moved++
			if before[i] != "t3" {
				t.Fatalf("key %d moved from %s, which is still there", i, before[i])
			}
		}
	}
	frac := float64(moved) / keys
	if math.Abs(frac-1.0/n) > 0.01 {
		t.Fatalf("moved %.4f of keys, want about %.4f", frac, 1.0/n)
	}
}

func TestWeightsSplitProportionally(t *testing.T) {
	targets := fleet(Target{Name: "w1", Region: "r", Weight: 1}, Target{Name: "w2", Region: "r", Weight: 2},
		Target{Name: "w3", Region: "r", Weight: 3})
	const keys = 100000
	counts := fillShares(targets, keys)
	for name, w := range map[string]float64{"w1": 1, "w2": 2, "w3": 3} {
		want := w / 6
		got := float64(counts[name]) / keys
		if math.Abs(got-want)/want > 0.05 {
			t.Errorf("%s got %.4f of keys, want %.4f ±5%%", name, got, want)
		}
	}
}
