// Package placement decides where the response to one request comes from: a redirect to a stored
// copy, or inline (with, on a miss, a grant to fill a target). It is a pure function over plain
// data: no I/O, no clock (the time is part of the request), no etcd or gRPC.
//
// Ranking among copies is, in order: targets that are not draining, the agent's own region, the
// policy's region preference, then weighted rendezvous hashing on the content key, so equal inputs
// give equal answers and adding or removing one of N targets moves about 1/N of the keys.
//
// A fill goes to an active target in the agent's region; a region without one fails over to the
// first region of the policy's preference that has one, then to weighted rendezvous over every
// other region, unless the policy forbids cross-region fills. Home and InRegion make the same
// choices for copies the control plane makes itself (drain migration, cross-region copies).
package placement

import (
	"math"
	"time"
)

// State is an operator's intent for a target.
type State uint8

// Target states.
const (
	Active State = iota
	Draining
	Disabled
)

// Target is what placement knows of a target.
type Target struct {
	Name    string
	Region  string
	Weight  uint32
	State   State
	Healthy bool
}

// Copy is a READY copy of the requested content at a target.
type Copy struct {
	Target  string
	Size    uint64
	Expires time.Time // zero: never
}

// Policy holds the fleet-wide settings placement uses.
type Policy struct {
	MinRedirectBytes uint64
	RegionPreference []string
	// ForbidCrossRegionFills keeps every fill in the agent's own region (data residency): an agent
	// whose region has no fillable target fills nothing.
	ForbidCrossRegionFills bool
}

// Request is one placement question.
type Request struct {
	Key      string
	Accepted []string // target names the client accepts, in client order
	Region   string   // the agent's region
	SizeHint uint64   // 0: unknown
	Now      time.Time
}

// Result is the kind of answer.
type Result uint8

// Results.
const (
	Inline Result = iota
	Redirect
)

func (r Result) String() string {
	if r == Redirect {
		return "redirect"
	}
	return "inline"
}

// Reason says why, in a form metrics and logs can group by.
type Reason string

// Reasons.
const (
	ReasonReady                Reason = "ready"                       // redirect to a READY copy
	ReasonNoCandidates         Reason = "no_candidates"               // no accepted target is known, healthy and enabled
	ReasonBelowMinSize         Reason = "below_min_size"              // too small to be worth a redirect
	ReasonFill                 Reason = "fill"                        // miss; fill at a target in the agent's region
	ReasonFillRemote           Reason = "fill_remote"                 // miss; no fillable target in the agent's region, fill in another
	ReasonNoFillTarget         Reason = "no_fill_target"              // miss; no active candidate may be filled
	ReasonCrossRegionForbidden Reason = "cross_region_fill_forbidden" // miss; only other regions could be filled, and the policy forbids it
	ReasonFillInProgress       Reason = "fill_in_progress"            // miss; another agent holds the claim
	ReasonClaimFailed          Reason = "claim_failed"                // miss; the claim could not be recorded
)

// Decision is the answer.
type Decision struct {
	Result Result
	Reason Reason
	// For Redirect: the copy to send the client to.
	Copy Copy
	// For Inline with a fill: the target to fill, else "".
	Fill string
}

// Decide answers req. targets is every known target by name; copies are the READY copies of
// req.Key (expired ones are ignored here).
func Decide(targets map[string]Target, copies []Copy, p Policy, req Request) Decision {
	var best Copy
	var bestRank rank
	found := false
	for _, c := range copies {
		if !c.Expires.IsZero() && !req.Now.Before(c.Expires) {
			continue
		}
		t, ok := candidate(targets, req.Accepted, c.Target)
		if !ok {
			continue
		}
		r := rankOf(t, req, p)
		if !found || r.better(bestRank) {
			best, bestRank, found = c, r, true
		}
	}
	if found {
		if best.Size < p.MinRedirectBytes {
			return Decision{Result: Inline, Reason: ReasonBelowMinSize}
		}
		return Decision{Result: Redirect, Reason: ReasonReady, Copy: best}
	}
	if req.SizeHint > 0 && req.SizeHint < p.MinRedirectBytes {
		return Decision{Result: Inline, Reason: ReasonBelowMinSize}
	}
	hasCandidate := false
	for _, name := range req.Accepted {
		if t, ok := targets[name]; ok && usable(t) {
			hasCandidate = true
			break
		}
	}
	if !hasCandidate {
		return Decision{Result: Inline, Reason: ReasonNoCandidates}
	}
	fill, reason := fillChoice(targets, req.Accepted, req.Key, req.Region, p)
	return Decision{Result: Inline, Reason: reason, Fill: fill}
}

// Home is the target a copy of key made for region belongs at, chosen among every known target
// the way a fill for an agent in region is: the region's own targets, then the policy's region
// preference, then the rest (only the region's own when cross-region fills are forbidden). It
// returns "" when no active, healthy target qualifies. Draining targets' copies move here.
func Home(targets map[string]Target, p Policy, key, region string) string {
	name, _ := fillChoice(targets, nil, key, region, p)
	return name
}

// InRegion is the weighted-rendezvous choice for key among the active, healthy targets in region,
// or "" if it has none. Cross-region copies go there.
func InRegion(targets map[string]Target, key, region string) string {
	return choose(targets, nil, key, func(r string) bool { return r == region })
}

// fillChoice picks the fill target among names (every known target when nil): the agent's
// region, then each region of the policy's preference in order, then weighted rendezvous over all
// the remaining regions at once.
func fillChoice(targets map[string]Target, names []string, key, region string, p Policy) (string, Reason) {
	if fill := choose(targets, names, key, func(r string) bool { return r == region }); fill != "" {
		return fill, ReasonFill
	}
	if p.ForbidCrossRegionFills {
		if choose(targets, names, key, func(r string) bool { return r != region }) != "" {
			return "", ReasonCrossRegionForbidden
		}
		return "", ReasonNoFillTarget
	}
	for _, pr := range p.RegionPreference {
		if pr == region {
			continue
		}
		if fill := choose(targets, names, key, func(r string) bool { return r == pr }); fill != "" {
			return fill, ReasonFillRemote
		}
	}
	// Preferred regions have no fillable target here (or the loop above would have returned), so
	// "any other region" is the rest.
	if fill := choose(targets, names, key, func(r string) bool { return r != region }); fill != "" {
		return fill, ReasonFillRemote
	}
	return "", ReasonNoFillTarget
}

// usable reports whether t may serve anything at all.
func usable(t Target) bool { return t.Healthy && t.State != Disabled && t.Weight > 0 }

// candidate reports whether name is accepted by the client, known and usable.
func candidate(targets map[string]Target, accepted []string, name string) (Target, bool) {
	t, ok := targets[name]
	if !ok || !usable(t) {
		return Target{}, false
	}
	for _, a := range accepted {
		if a == name {
			return t, true
		}
	}
	return Target{}, false
}

// choose is the weighted-rendezvous choice among the active, usable targets named in names (every
// known target when nil) whose region satisfies in. A name listed twice scores the same both
// times, and ties go to the smaller name, so neither order nor duplicates change the answer.
func choose(targets map[string]Target, names []string, key string, in func(region string) bool) string {
	var best string
	var bestScore float64
	consider := func(t Target) {
		if !usable(t) || t.State != Active || !in(t.Region) {
			return
		}
		if s := Score(key, t.Name, t.Weight); best == "" || s > bestScore || (s == bestScore && t.Name < best) {
			best, bestScore = t.Name, s
		}
	}
	if names == nil {
		for _, t := range targets {
			consider(t)
		}
		return best
	}
	for _, name := range names {
		if t, ok := targets[name]; ok {
			consider(t)
		}
	}
	return best
}

// rank orders candidates; lower fields dominate higher ones.
type rank struct {
	draining   bool
	remote     bool
	preference int // index in the policy's region preference; len+1 when absent
	score      float64
	name       string
}

func rankOf(t Target, req Request, p Policy) rank {
	pref := len(p.RegionPreference) + 1
	for i, r := range p.RegionPreference {
		if r == t.Region {
			pref = i
			break
		}
	}
	return rank{draining: t.State == Draining, remote: t.Region != req.Region, preference: pref,
		score: Score(req.Key, t.Name, t.Weight), name: t.Name}
}

func (a rank) better(b rank) bool {
	if a.draining != b.draining {
		return !a.draining
	}
	if a.remote != b.remote {
		return !a.remote
	}
	if a.preference != b.preference {
		return a.preference < b.preference
	}
	if a.score != b.score {
		return a.score > b.score
	}
	return a.name < b.name
}

// Score is the weighted rendezvous score of target for key: weight / -ln(u), u uniform in (0,1)
// from a hash of both. The highest score wins; a target's share of keys is proportional to its
// weight.
func Score(key, target string, weight uint32) float64 {
	h := fnv64(key, target)
	// 53 random bits into (0,1), never 0 or 1.
	u := (float64(h>>11) + 0.5) / (1 << 53)
	return float64(weight) / -math.Log(u)
}

// fnv64 is FNV-1a over key, a zero byte and target, finished with a 64-bit mixer so that the low
// bits of short, similar inputs still spread.
func fnv64(key, target string) uint64 {
	const offset, prime = 14695981039346656037, 1099511628211
	h := uint64(offset)
	for i := 0; i < len(key); i++ {
		h = (h ^ uint64(key[i])) * prime
	}
	h = (h ^ 0) * prime
	for i := 0; i < len(target); i++ {
		h = (h ^ uint64(target[i])) * prime
	}
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}
