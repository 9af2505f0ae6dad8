// Package placement decides where the response to one request comes from: a redirect to a stored
// copy, or inline (with, on a miss, a grant to fill a target). It is a pure function over plain
// data: no I/O, no clock (the time is part of the request), no etcd or gRPC.
//
// Ranking among candidates is, in order: targets that are not draining, the agent's own region,
// the policy's region preference, then weighted rendezvous hashing on the content key, so equal
// inputs give equal answers and adding or removing one of N targets moves about 1/N of the keys.
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
	ReasonReady          Reason = "ready"            // redirect to a READY copy
	ReasonNoCandidates   Reason = "no_candidates"    // no accepted target is known, healthy and enabled
	ReasonBelowMinSize   Reason = "below_min_size"   // too small to be worth a redirect
	ReasonFill           Reason = "fill"             // miss; fill at a target in the agent's region
	ReasonFillRemote     Reason = "fill_remote"      // miss; fill at a preferred other region
	ReasonNoFillTarget   Reason = "no_fill_target"   // miss; no active candidate may be filled
	ReasonFillInProgress Reason = "fill_in_progress" // miss; another agent holds the claim
	ReasonClaimFailed    Reason = "claim_failed"     // miss; the claim could not be recorded
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
	if fill := fillTarget(targets, req, req.Region); fill != "" {
		return Decision{Result: Inline, Reason: ReasonFill, Fill: fill}
	}
	for _, region := range p.RegionPreference {
		if region == req.Region {
			continue
		}
		if fill := fillTarget(targets, req, region); fill != "" {
			return Decision{Result: Inline, Reason: ReasonFillRemote, Fill: fill}
		}
	}
	return Decision{Result: Inline, Reason: ReasonNoFillTarget}
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

// fillTarget is the weighted-rendezvous choice among active accepted candidates in region. A name
// the client lists twice scores the same both times, so duplicates need no special case.
func fillTarget(targets map[string]Target, req Request, region string) string {
	var best string
	var bestScore float64
	for _, name := range req.Accepted {
		t, ok := targets[name]
		if !ok || !usable(t) || t.State != Active || t.Region != region {
			continue
		}
		if s := Score(req.Key, t.Name, t.Weight); best == "" || s > bestScore || (s == bestScore && name < best) {
			best, bestScore = name, s
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
