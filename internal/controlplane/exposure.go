package controlplane

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// exposures records, per target, the requests of origins that require credentials that were
// redirected to (or filled at) the target while its URLs were not signed: anyone who obtains such
// a URL can fetch private content, which the agent's access check cannot prevent. Kept in this
// replica's memory only: it is a warning for operators (GetTarget, ListTargets and the log), not
// state that placement depends on, and writing it to etcd would cost a write on a hot path.
type exposures struct {
	m sync.Map // target uid → *exposure
}

type exposure struct {
	first time.Time
	count atomic.Int64
	last  atomic.Int64 // unix nanoseconds
}

// signed reports whether t hands out V4-signed URLs, the only form that expires.
func signed(t *pb.Target) bool {
	_, ok := t.GetUrlForm().GetForm().(*pb.UrlForm_Signed)
	return ok
}

// note records one request of an origin that requires credentials placed at t, if t's URLs are not
// signed, and reports whether it was the first for t.
func (e *exposures) note(t *pb.Target, now time.Time) bool {
	if signed(t) {
		return false
	}
	v, loaded := e.m.LoadOrStore(t.Uid, &exposure{first: now})
	x := v.(*exposure)
	x.count.Add(1)
	x.last.Store(now.UnixNano())
	return !loaded
}

// warnings returns what an operator should know about t.
func (e *exposures) warnings(t *pb.Target) []string {
	v, ok := e.m.Load(t.Uid)
	if !ok || signed(t) {
		return nil
	}
	x := v.(*exposure)
	return []string{fmt.Sprintf("%d requests of an origin that requires credentials were placed at this target since %s (last %s), "+
		"but its URLs are not signed: anyone who obtains a location URL can fetch private content; use signed URLs (--signed-ttl)",
		x.count.Load(), x.first.UTC().Format(time.RFC3339), time.Unix(0, x.last.Load()).UTC().Format(time.RFC3339))}
}

// noteExposure records a placement of private content at t, warning at the first one.
func (s *Service) noteExposure(t *pb.Target, now time.Time) {
	if s.exposures.note(t, now) {
		s.cfg.Log.Warn("content of an origin that requires credentials is placed at a target whose URLs are not signed: "+
			"anyone who obtains a location URL can fetch it; give the target signed URLs", "target", t.Name)
	}
}

// withWarnings returns a copy of t with the server's warnings filled in.
func (s *Service) withWarnings(t *pb.Target) *pb.Target {
	out := proto.Clone(t).(*pb.Target)
	out.Warnings = s.exposures.warnings(t)
	return out
}
