package placement

// The placement algorithm as it was before Fleet indexed it (commit dc085b5), kept to check that
// the indexed path gives the same answers and to measure both in one run.

import "math"

// Decide answers req. targets is every known target by name; copies are the READY copies of
// req.Key (expired ones are ignored here).
func refDecide(targets map[string]Target, copies []Copy, p Policy, req Request) Decision {
	var best Copy
	var bestRank refRank
	found := false
	for _, c := range copies {
		if !c.Expires.IsZero() && !req.Now.Before(c.Expires) {
			continue
		}
		t, ok := refCandidate(targets, req.Accepted, c.Target)
		if !ok {
			continue
		}
		r := refRankOf(t, req, p)
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
		if t, ok := targets[name]; ok && refUsable(t) {
			hasCandidate = true
			break
		}
	}
	if !hasCandidate {
		return Decision{Result: Inline, Reason: ReasonNoCandidates}
	}
	fill, reason := refFillChoice(targets, req.Accepted, req.Key, req.Region, p)
	return Decision{Result: Inline, Reason: reason, Fill: fill}
}

// Home is the target a copy of key made for region belongs at, chosen among every known target
// the way a fill for an agent in region is: the region's own targets, then the policy's region
// preference, then the rest (only the region's own when cross-region fills are forbidden). It
// returns "" when no active, healthy target qualifies. Draining targets' copies move here.
func refHome(targets map[string]Target, p Policy, key, region string) string {
	name, _ := refFillChoice(targets, nil, key, region, p)
	return name
}

// InRegion is the weighted-rendezvous choice for key among the active, healthy targets in region,
// or "" if it has none. Cross-region copies go there.
func refInRegion(targets map[string]Target, key, region string) string {
	return refChoose(targets, nil, key, func(r string) bool { return r == region })
}

// fillChoice picks the fill target among names (every known target when nil): the agent's
// region, then each region of the policy's preference in order, then weighted rendezvous over all
// the remaining regions at once.
func refFillChoice(targets map[string]Target, names []string, key, region string, p Policy) (string, Reason) {
	if fill := refChoose(targets, names, key, func(r string) bool { return r == region }); fill != "" {
		return fill, ReasonFill
	}
	if p.ForbidCrossRegionFills {
		if refChoose(targets, names, key, func(r string) bool { return r != region }) != "" {
			return "", ReasonCrossRegionForbidden
		}
		return "", ReasonNoFillTarget
	}
	for _, pr := range p.RegionPreference {
		if pr == region {
			continue
		}
		if fill := refChoose(targets, names, key, func(r string) bool { return r == pr }); fill != "" {
			return fill, ReasonFillRemote
		}
	}
	// Preferred regions have no fillable target here (or the loop above would have returned), so
	// "any other region" is the rest.
	if fill := refChoose(targets, names, key, func(r string) bool { return r != region }); fill != "" {
		return fill, ReasonFillRemote
	}
	return "", ReasonNoFillTarget
}

// usable reports whether t may serve anything at all.
func refUsable(t Target) bool { return t.Healthy && t.State != Disabled && t.Weight > 0 }

// candidate reports whether name is accepted by the client, known and usable.
func refCandidate(targets map[string]Target, accepted []string, name string) (Target, bool) {
	t, ok := targets[name]
	if !ok || !refUsable(t) {
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
func refChoose(targets map[string]Target, names []string, key string, in func(region string) bool) string {
	var best string
	var bestScore float64
	consider := func(t Target) {
		if !refUsable(t) || t.State != Active || !in(t.Region) {
			return
		}
		if s := refScore(key, t.Name, t.Weight); best == "" || s > bestScore || (s == bestScore && t.Name < best) {
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
type refRank struct {
	draining   bool
	remote     bool
	preference int // index in the policy's region preference; len+1 when absent
	score      float64
	name       string
}

func refRankOf(t Target, req Request, p Policy) refRank {
	pref := len(p.RegionPreference) + 1
	for i, r := range p.RegionPreference {
		if r == t.Region {
			pref = i
			break
		}
	}
	return refRank{draining: t.State == Draining, remote: t.Region != req.Region, preference: pref,
		score: refScore(req.Key, t.Name, t.Weight), name: t.Name}
}

func (a refRank) better(b refRank) bool {
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
func refScore(key, target string, weight uint32) float64 {
	h := refFnv64(key, target)
	// 53 random bits into (0,1), never 0 or 1.
	u := (float64(h>>11) + 0.5) / (1 << 53)
	return float64(weight) / -math.Log(u)
}

// fnv64 is FNV-1a over key, a zero byte and target, finished with a 64-bit mixer so that the low
// bits of short, similar inputs still spread.
func refFnv64(key, target string) uint64 {
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
