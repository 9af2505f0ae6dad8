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

// Two regions and the ways an operator takes a region's store away: drain, disable, lose it
// (unhealthy), or forbid fills from leaving a region.
func TestDecideAcrossRegions(t *testing.T) {
	us := Target{Name: "us-gcs", Region: "us"}
	eu := Target{Name: "eu-gcs", Region: "eu"}
	ap := Target{Name: "ap-gcs", Region: "ap"}
	sa := Target{Name: "sa-gcs", Region: "sa"}
	with := func(state State, healthy bool, t Target) Target {
		t.State, t.Healthy, t.Weight = state, healthy, 1
		return t
	}
	euDraining, euDisabled, euSick := with(Draining, true, eu), with(Disabled, true, eu), with(Active, false, eu)
	mk := func(ts ...Target) map[string]Target {
		m := map[string]Target{}
		for _, t := range ts {
			if t.Weight == 0 {
				t = with(t.State, true, t)
			}
			m[t.Name] = t
		}
		return m
	}
	all := []string{"us-gcs", "eu-gcs", "ap-gcs", "sa-gcs"}
	copyAt := func(name string) []Copy { return []Copy{{Target: name, Size: 500}} }
	redirect := func(name string) Decision {
		return Decision{Result: Redirect, Reason: ReasonReady, Copy: Copy{Target: name, Size: 500}}
	}
	fillAt := func(name string, r Reason) Decision { return Decision{Result: Inline, Reason: r, Fill: name} }
	noPref, euFirst := Policy{}, Policy{RegionPreference: []string{"ap", "us"}}
	forbid := Policy{RegionPreference: []string{"us"}, ForbidCrossRegionFills: true}
	cases := []struct {
		name    string
		targets map[string]Target
		copies  []Copy
		pol     Policy
		want    Decision
	}{
		{"own region fills", mk(us, eu), nil, noPref, fillAt("eu-gcs", ReasonFill)},
		{"draining own region fails over to a region not in the preference", mk(us, euDraining), nil, noPref, fillAt("us-gcs", ReasonFillRemote)},
		{"disabled own region fails over", mk(us, euDisabled), nil, noPref, fillAt("us-gcs", ReasonFillRemote)},
		{"unhealthy own region fails over", mk(us, euSick), nil, noPref, fillAt("us-gcs", ReasonFillRemote)},
		{"failover takes the preference's first region that has a target", mk(us, euDisabled, ap, sa), nil, euFirst, fillAt("ap-gcs", ReasonFillRemote)},
		{"failover skips preferred regions without a fillable target", mk(us, euDisabled, with(Draining, true, ap), sa), nil, euFirst, fillAt("us-gcs", ReasonFillRemote)},
		{"forbidden failover fills nothing", mk(us, euDisabled), nil, forbid, Decision{Result: Inline, Reason: ReasonCrossRegionForbidden}},
		{"forbidden failover still fills in the own region", mk(us, eu), nil, forbid, fillAt("eu-gcs", ReasonFill)},
		{"no fillable target anywhere", mk(with(Draining, true, us), euDraining), nil, noPref, Decision{Result: Inline, Reason: ReasonNoFillTarget}},
		{"a draining target serves its sole copy", mk(us, euDraining), copyAt("eu-gcs"), noPref, redirect("eu-gcs")},
		{"a draining target serves its sole copy cross-region", mk(us, euDraining), copyAt("eu-gcs"), forbid, redirect("eu-gcs")},
		{"a draining copy yields to a copy in another region", mk(us, euDraining),
			[]Copy{{Target: "eu-gcs", Size: 500}, {Target: "us-gcs", Size: 500}}, noPref, redirect("us-gcs")},
		{"a draining copy is used while the other copy's target is unhealthy", mk(with(Active, false, us), euDraining),
			[]Copy{{Target: "eu-gcs", Size: 500}, {Target: "us-gcs", Size: 500}}, noPref, redirect("eu-gcs")},
		{"a disabled target's copy is never used", mk(us, euDisabled), copyAt("eu-gcs"), noPref, fillAt("us-gcs", ReasonFillRemote)},
		{"an in-region copy beats a cross-region one", mk(us, eu),
			[]Copy{{Target: "us-gcs", Size: 500}, {Target: "eu-gcs", Size: 500}}, euFirst, redirect("eu-gcs")},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req := Request{Key: "k", Accepted: all, Region: "eu", Now: now}
			got := Decide(c.targets, c.copies, c.pol, req)
			if got != c.want {
				t.Fatalf("got %+v\nwant %+v", got, c.want)
			}
			if again := Decide(c.targets, c.copies, c.pol, req); again != got {
				t.Fatalf("not deterministic: %+v then %+v", got, again)
			}
		})
	}
}

// Failover to the regions outside the preference spreads by weight, like fills within a region,
// and ignores the order the client lists targets in.
func TestFailoverToUnpreferredRegionsIsWeightedRendezvous(t *testing.T) {
	targets := fleet(Target{Name: "eu", Region: "eu", State: Disabled}, Target{Name: "ap", Region: "ap", Weight: 1},
		Target{Name: "sa", Region: "sa", Weight: 3})
	const keys = 20000
	counts := map[string]int{}
	for i := range keys {
		req := Request{Key: fmt.Sprint(i), Accepted: []string{"eu", "ap", "sa"}, Region: "eu", Now: now}
		d := Decide(targets, nil, Policy{}, req)
		req.Accepted = []string{"sa", "ap", "eu"}
		if again := Decide(targets, nil, Policy{}, req); again != d {
			t.Fatalf("key %d: client order changed the fill: %+v, %+v", i, d, again)
		}
		counts[d.Fill]++
	}
	if got := float64(counts["sa"]) / keys; math.Abs(got-0.75) > 0.03 {
		t.Fatalf("sa got %.3f of the failed-over keys, want 0.75 (weights 1:3): %v", got, counts)
	}
}

func TestHomeAndInRegion(t *testing.T) {
	targets := fleet(Target{Name: "eu-a", Region: "eu", State: Draining}, Target{Name: "eu-b", Region: "eu"},
		Target{Name: "us-a", Region: "us"}, Target{Name: "ap-a", Region: "ap"})
	pref := Policy{RegionPreference: []string{"ap"}}
	cases := []struct {
		name    string
		targets map[string]Target
		pol     Policy
		region  string
		home    string
		in      string
	}{
		{"the region's own active target", targets, pref, "eu", "eu-b", "eu-b"},
		{"a region without targets: the preference first", targets, pref, "sa", "ap-a", ""},
		{"a region without targets and no preference: any", fleet(Target{Name: "us-a", Region: "us"}), Policy{}, "sa", "us-a", ""},
		{"forbidden across regions", targets, Policy{RegionPreference: []string{"ap"}, ForbidCrossRegionFills: true}, "sa", "", ""},
		{"only a draining target in the region", fleet(Target{Name: "eu-a", Region: "eu", State: Draining}, Target{Name: "us-a", Region: "us"}),
			Policy{}, "eu", "us-a", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := Home(c.targets, c.pol, "k", c.region); got != c.home {
				t.Errorf("Home = %q, want %q", got, c.home)
			}
			if got := InRegion(c.targets, "k", c.region); got != c.in {
				t.Errorf("InRegion = %q, want %q", got, c.in)
			}
		})
	}
}
