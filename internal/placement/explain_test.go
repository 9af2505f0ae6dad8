package placement

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

func hasStep(tr Trace, substr string) bool {
	for _, s := range tr.Steps {
		if strings.Contains(s, substr) {
			return true
		}
	}
	return false
}

func tracedCopy(t *testing.T, tr Trace, target string) TracedCopy {
	t.Helper()
	for _, c := range tr.Copies {
		if c.Copy.Target == target {
			return c
		}
	}
	t.Fatalf("no traced copy at %s in %+v", target, tr.Copies)
	return TracedCopy{}
}

func TestExplainShowsWhyEachCopyWonOrWasDropped(t *testing.T) {
	targets := fleet(
		Target{Name: "us-a", Region: "us"},
		Target{Name: "us-drain", Region: "us", State: Draining},
		Target{Name: "eu-a", Region: "eu"},
		Target{Name: "eu-off", Region: "eu", State: Disabled},
	)
	pol := Policy{RegionPreference: []string{"us", "eu"}}
	all := []string{"us-a", "us-drain", "eu-a", "eu-off"}

	t.Run("hit in region", func(t *testing.T) {
		d, tr := Explain(targets, []Copy{{Target: "eu-a", Size: 9}, {Target: "us-a", Size: 9},
			{Target: "eu-off", Size: 9}, {Target: "gone", Size: 9}, {Target: "us-drain", Size: 9, Expires: now}},
			pol, Request{Key: "k", Accepted: all, Region: "us", Now: now})
		if d.Result != Redirect || d.Copy.Target != "us-a" {
			t.Fatalf("decision %+v", d)
		}
		if c := tracedCopy(t, tr, "us-a"); !c.Kept || c.Rank != 1 || c.Remote {
			t.Fatalf("us-a: %+v", c)
		}
		if c := tracedCopy(t, tr, "eu-a"); !c.Kept || c.Rank != 2 || !c.Remote || c.Preference != 1 {
			t.Fatalf("eu-a: %+v", c)
		}
		for target, why := range map[string]string{"eu-off": "disabled", "gone": "unknown target", "us-drain": "expired"} {
			if c := tracedCopy(t, tr, target); c.Kept || !strings.Contains(c.Dropped, why) {
				t.Fatalf("%s: %+v, want dropped for %q", target, c, why)
			}
		}
		if !hasStep(tr, "redirect to us-a") {
			t.Fatalf("steps: %q", tr.Steps)
		}
	})

	t.Run("drain: the draining copy ranks last", func(t *testing.T) {
		d, tr := Explain(targets, []Copy{{Target: "us-drain", Size: 9}, {Target: "eu-a", Size: 9}}, pol,
			Request{Key: "k", Accepted: all, Region: "us", Now: now})
		if d.Copy.Target != "eu-a" {
			t.Fatalf("decision %+v", d)
		}
		if c := tracedCopy(t, tr, "us-drain"); !c.Kept || !c.Draining || c.Rank != 2 {
			t.Fatalf("us-drain: %+v", c)
		}
	})

	t.Run("miss fails over across regions", func(t *testing.T) {
		d, tr := Explain(targets, nil, pol, Request{Key: "k", Accepted: []string{"us-drain", "eu-a", "eu-off", "nope"}, Region: "us", Now: now})
		if d.Fill != "eu-a" || d.Reason != ReasonFillRemote {
			t.Fatalf("decision %+v", d)
		}
		want := map[string]string{"us-drain": "draining", "eu-off": "disabled", "nope": "unknown target"}
		for _, tt := range tr.Targets {
			switch {
			case tt.Name == "eu-a" && (!tt.Kept || tt.RegionOrder != 1 || tt.Score <= 0):
				t.Fatalf("eu-a: %+v", tt)
			case tt.Name != "eu-a" && (tt.Kept || !strings.Contains(tt.Dropped, want[tt.Name])):
				t.Fatalf("%s: %+v, want dropped for %q", tt.Name, tt, want[tt.Name])
			}
		}
		if !hasStep(tr, "cross-region") {
			t.Fatalf("steps: %q", tr.Steps)
		}
	})
}

// Explain must give Decide's answer whatever the inputs, so that what an operator is shown is what
// agents get; its ranking of copies must choose Decide's copy.
func TestExplainAgreesWithDecide(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	regions := []string{"us", "eu", "ap"}
	for i := 0; i < 2000; i++ {
		targets := map[string]Target{}
		var all []string
		for j := 0; j < 1+rng.IntN(6); j++ {
			name := fmt.Sprintf("t%d", j)
			targets[name] = Target{Name: name, Region: regions[rng.IntN(3)], Weight: uint32(rng.IntN(3)),
				State: State(rng.IntN(3)), Healthy: rng.IntN(4) > 0}
			all = append(all, name)
		}
		var copies []Copy
		for _, n := range all {
			if rng.IntN(2) == 0 {
				c := Copy{Target: n, Size: uint64(rng.IntN(200))}
				if rng.IntN(4) == 0 {
					c.Expires = now.Add(time.Duration(rng.IntN(3)-1) * time.Minute)
				}
				copies = append(copies, c)
			}
		}
		accepted := all[:rng.IntN(len(all)+1)]
		p := Policy{MinRedirectBytes: uint64(rng.IntN(2) * 100), ForbidCrossRegionFills: rng.IntN(4) == 0}
		if rng.IntN(2) == 0 {
			p.RegionPreference = []string{"eu", "us"}
		}
		req := Request{Key: fmt.Sprint("key", i), Accepted: accepted, Region: regions[rng.IntN(3)], SizeHint: uint64(rng.IntN(200)), Now: now}
		got, tr := Explain(targets, copies, p, req)
		if want := Decide(targets, copies, p, req); got != want {
			t.Fatalf("case %d: Explain %+v, Decide %+v", i, got, want)
		}
		for _, c := range tr.Copies {
			if c.Rank == 1 && got.Reason == ReasonReady && c.Copy != got.Copy {
				t.Fatalf("case %d: trace ranks %s first, Decide chose %s", i, c.Copy.Target, got.Copy.Target)
			}
		}
	}
}
