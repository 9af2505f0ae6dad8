package placement

import (
	"math"
	"slices"
	"strings"
	"sync/atomic"
)

// Fleet is the targets and policy placement decides over, indexed once (per snapshot, not per
// request): targets by name, the fillable ones by region, each one's place in the policy's region
// preference. A decision over a Fleet hashes the key once and allocates nothing. A Fleet is
// immutable apart from a memo of recent accepted lists, and safe for concurrent use.
type Fleet struct {
	policy  Policy
	members []member // sorted by name
	byName  map[string]int32
	regions map[string]int32 // region → index in fillable
	// fillable holds, per region, the members that are active and usable: the only ones a fill
	// can go to.
	fillable [][]int32
	// preferred is the policy's region preference as region indices (unknown regions left out).
	preferred []int32
	usable    set
	memo      [memoSlots]atomic.Pointer[acceptedList]
}

type member struct {
	Target
	usable     bool
	preference int // index in the policy's region preference; len+1 when absent
}

// NewFleet indexes targets (every known target by name) and p.
func NewFleet(targets map[string]Target, p Policy) *Fleet {
	f := &Fleet{policy: p, byName: make(map[string]int32, len(targets)), regions: map[string]int32{}}
	names := make([]string, 0, len(targets))
	for name := range targets {
		names = append(names, name)
	}
	slices.Sort(names)
	f.usable = make(set, (len(names)+63)/64)
	for i, name := range names {
		t := targets[name]
		m := member{Target: t, usable: usable(t), preference: len(p.RegionPreference) + 1}
		if j := slices.Index(p.RegionPreference, t.Region); j >= 0 {
			m.preference = j
		}
		f.members = append(f.members, m)
		f.byName[name] = int32(i)
		r, ok := f.regions[t.Region]
		if !ok {
			r = int32(len(f.fillable))
			f.regions[t.Region] = r
			f.fillable = append(f.fillable, nil)
		}
		if m.usable {
			f.usable.add(int32(i))
			if t.State == Active {
				f.fillable[r] = append(f.fillable[r], int32(i))
			}
		}
	}
	for _, pr := range p.RegionPreference {
		if r, ok := f.regions[pr]; ok {
			f.preferred = append(f.preferred, r)
		}
	}
	return f
}

// Decide answers req; copies are the READY copies of req.Key (expired ones are ignored here).
func (f *Fleet) Decide(copies []Copy, req Request) Decision {
	acc := f.accepted(req.Accepted)
	kh := keyHash(req.Key)
	var best Copy
	var bestRank rank
	found := false
	for _, c := range copies {
		if !c.Expires.IsZero() && !req.Now.Before(c.Expires) {
			continue
		}
		i, ok := f.byName[c.Target]
		if !ok || !f.members[i].usable || !acc.has(i) {
			continue
		}
		m := &f.members[i]
		r := rank{draining: m.State == Draining, remote: m.Region != req.Region, preference: m.preference,
			score: scoreAt(kh, m.Name, m.Weight), name: m.Name}
		if !found || r.better(bestRank) {
			best, bestRank, found = c, r, true
		}
	}
	if found {
		if best.Size < f.policy.MinRedirectBytes {
			return Decision{Result: Inline, Reason: ReasonBelowMinSize}
		}
		return Decision{Result: Redirect, Reason: ReasonReady, Copy: best}
	}
	if req.SizeHint > 0 && req.SizeHint < f.policy.MinRedirectBytes {
		return Decision{Result: Inline, Reason: ReasonBelowMinSize}
	}
	if !acc.meets(f.usable) {
		return Decision{Result: Inline, Reason: ReasonNoCandidates}
	}
	fill, reason := f.fillChoice(acc, kh, req.Region)
	return Decision{Result: Inline, Reason: reason, Fill: fill}
}

// Home is the package-level Home over the fleet.
func (f *Fleet) Home(key, region string) string {
	name, _ := f.fillChoice(nil, keyHash(key), region)
	return name
}

// InRegion is the package-level InRegion over the fleet.
func (f *Fleet) InRegion(key, region string) string {
	r, ok := f.regions[region]
	if !ok {
		return ""
	}
	return f.name(f.chooseIn(nil, keyHash(key), r, -1))
}

// fillChoice picks the fill target among acc (every known target when nil): the agent's region,
// then each region of the policy's preference in order, then weighted rendezvous over all the
// remaining regions at once.
func (f *Fleet) fillChoice(acc set, kh uint64, region string) (string, Reason) {
	home, ok := f.regions[region]
	if !ok {
		home = -1
	} else if i := f.chooseIn(acc, kh, home, -1); i >= 0 {
		return f.members[i].Name, ReasonFill
	}
	if f.policy.ForbidCrossRegionFills {
		if f.chooseOutside(acc, kh, home) >= 0 {
			return "", ReasonCrossRegionForbidden
		}
		return "", ReasonNoFillTarget
	}
	for _, r := range f.preferred {
		if r == home {
			continue
		}
		if i := f.chooseIn(acc, kh, r, -1); i >= 0 {
			return f.members[i].Name, ReasonFillRemote
		}
	}
	// Preferred regions have no fillable target here (or the loop above would have returned), so
	// "any other region" is the rest.
	if i := f.chooseOutside(acc, kh, home); i >= 0 {
		return f.members[i].Name, ReasonFillRemote
	}
	return "", ReasonNoFillTarget
}

// chooseIn is the weighted-rendezvous choice among region r's fillable members in acc (all when
// nil), or best if none beats it (-1: none). Ties go to the smaller name, so neither order nor
// duplicates change the answer.
func (f *Fleet) chooseIn(acc set, kh uint64, r int32, best int32) int32 {
	var bestScore float64
	if best >= 0 {
		bestScore = scoreAt(kh, f.members[best].Name, f.members[best].Weight)
	}
	for _, i := range f.fillable[r] {
		if acc != nil && !acc.has(i) {
			continue
		}
		m := &f.members[i]
		u := uniform(targetHash(kh, m.Name))
		if best >= 0 && cannotBeat(m.Weight, u, bestScore) {
			continue // most targets, once a good one is found: the logarithm is most of a score's cost
		}
		if s := float64(m.Weight) / -math.Log(u); best < 0 || s > bestScore || (s == bestScore && m.Name < f.members[best].Name) {
			best, bestScore = i, s
		}
	}
	return best
}

// chooseOutside is the weighted-rendezvous choice among the fillable members in acc (all when
// nil) of every region but home, or -1.
func (f *Fleet) chooseOutside(acc set, kh uint64, home int32) int32 {
	best := int32(-1)
	for r := range f.fillable {
		if int32(r) != home {
			best = f.chooseIn(acc, kh, int32(r), best)
		}
	}
	return best
}

func (f *Fleet) name(i int32) string {
	if i < 0 {
		return ""
	}
	return f.members[i].Name
}

// set is a set of members by index.
type set []uint64

func (s set) add(i int32)      { s[i>>6] |= 1 << (i & 63) }
func (s set) has(i int32) bool { return s[i>>6]&(1<<(i&63)) != 0 }

// meets reports whether s and o have a member in common.
func (s set) meets(o set) bool {
	for i := range s {
		if s[i]&o[i] != 0 {
			return true
		}
	}
	return false
}

// memoSlots bounds the accepted lists a Fleet remembers. Clients send the list of targets their
// agent advertised, so a fleet sees few distinct lists; a list not remembered costs a map lookup
// per name, as every request did before the memo.
const memoSlots = 8

type acceptedList struct {
	names []string
	set   set
}

// accepted is the set of known members named in names.
func (f *Fleet) accepted(names []string) set {
	slot := &f.memo[memoSlot(names)]
	if a := slot.Load(); a != nil && slices.Equal(a.names, names) {
		return a.set
	}
	s := make(set, len(f.usable))
	for _, n := range names {
		if i, ok := f.byName[n]; ok {
			s.add(i)
		}
	}
	// Copies of the names, not of the headers: the request's strings are not kept, and a later
	// request's list is compared byte by byte, as a decoded one always is.
	kept := make([]string, len(names))
	for i, n := range names {
		kept[i] = strings.Clone(n)
	}
	slot.Store(&acceptedList{names: kept, set: s})
	return s
}

// memoSlot spreads lists over the memo by their length and last name, which is cheap and tells
// apart the lists agents of different regions advertise.
func memoSlot(names []string) int {
	h := len(names)
	if h > 0 {
		last := names[h-1]
		h = h*31 + len(last)
		if len(last) > 0 {
			h = h*31 + int(last[len(last)-1])
		}
	}
	return h % memoSlots
}
