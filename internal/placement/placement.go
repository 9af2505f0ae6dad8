// Package placement decides where the response to one request comes from: a redirect to a stored
// copy, or inline (with, on a miss, a grant to fill a target). It is a pure function over plain
// data: no I/O, no clock (the time is part of the request), no etcd or gRPC. A caller that answers
// many requests over one set of targets indexes them once as a Fleet.
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

// Decide answers req over targets (every known target by name) and p; copies are the READY copies
// of req.Key (expired ones are ignored here). It indexes targets first: callers that answer many
// requests over the same targets build a Fleet once and use its Decide.
func Decide(targets map[string]Target, copies []Copy, p Policy, req Request) Decision {
	return NewFleet(targets, p).Decide(copies, req)
}

// Home is the target a copy of key made for region belongs at, chosen among every known target
// the way a fill for an agent in region is: the region's own targets, then the policy's region
// preference, then the rest (only the region's own when cross-region fills are forbidden). It
// returns "" when no active, healthy target qualifies. Draining targets' copies move here.
func Home(targets map[string]Target, p Policy, key, region string) string {
	return NewFleet(targets, p).Home(key, region)
}

// InRegion is the weighted-rendezvous choice for key among the active, healthy targets in region,
// or "" if it has none. Cross-region copies go there.
func InRegion(targets map[string]Target, key, region string) string {
	return NewFleet(targets, Policy{}).InRegion(key, region)
}

// usable reports whether t may serve anything at all.
func usable(t Target) bool { return t.Healthy && t.State != Disabled && t.Weight > 0 }

// rank orders candidates; lower fields dominate higher ones.
type rank struct {
	draining   bool
	remote     bool
	preference int // index in the policy's region preference; len+1 when absent
	score      float64
	name       string
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

const fnvOffset, fnvPrime = 14695981039346656037, 1099511628211

// Score is the weighted rendezvous score of target for key: weight / -ln(u), u uniform in (0,1)
// from a hash of both. The highest score wins; a target's share of keys is proportional to its
// weight.
func Score(key, target string, weight uint32) float64 {
	return scoreAt(keyHash(key), target, weight)
}

// keyHash is FNV-1a over key and a zero byte: the part of a score's hash that every target of
// one request shares, so a request hashes its key once, not once per target.
func keyHash(key string) uint64 {
	h := uint64(fnvOffset)
	for i := 0; i < len(key); i++ {
		h = (h ^ uint64(key[i])) * fnvPrime
	}
	return (h ^ 0) * fnvPrime
}

// scoreAt continues FNV-1a from a keyHash over target and turns the hash into the score.
func scoreAt(h uint64, target string, weight uint32) float64 {
	return float64(weight) / -math.Log(uniform(targetHash(h, target)))
}

// targetHash continues FNV-1a from a keyHash over target and finishes it with a 64-bit mixer so
// that the low bits of short, similar inputs still spread.
func targetHash(h uint64, target string) uint64 {
	for i := 0; i < len(target); i++ {
		h = (h ^ uint64(target[i])) * fnvPrime
	}
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

// uniform maps 53 random bits of h into (0,1), never 0 or 1.
func uniform(h uint64) float64 { return (float64(h>>11) + 0.5) / (1 << 53) }

// cannotBeat reports, without the logarithm, that a target of weight whose hash maps to u scores
// strictly less than best. Since -ln(u) > 1-u, weight/(1-u) bounds the score from above; the
// margin of 2^-30 is far wider than the rounding of Log and the divisions (a few 2^-52), so a
// target it rules out would have lost to best, ties included, had its score been computed.
func cannotBeat(weight uint32, u, best float64) bool {
	return float64(weight) < best*(1-1.0/(1<<30))*(1-u)
}
