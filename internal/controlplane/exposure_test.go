package controlplane

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Content of an origin that requires credentials placed at a target whose URLs anyone can fetch
// is a warning on the target while its URLs stay unsigned; a signed target raises none, and a
// target made signed stops showing it.
func TestExposureWarnsOnlyForUnsignedTargets(t *testing.T) {
	t.Parallel()
	public := &pb.Target{Name: "pub", Uid: "u1", UrlForm: &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: "https://b/"}}}
	cdn := &pb.Target{Name: "cdn", Uid: "u2", UrlForm: &pb.UrlForm{Form: &pb.UrlForm_CdnBaseUrl{CdnBaseUrl: "https://c/"}}}
	signedT := &pb.Target{Name: "sig", Uid: "u3", UrlForm: &pb.UrlForm{Form: &pb.UrlForm_Signed{Signed: &pb.SignedUrls{Ttl: durationpb.New(time.Minute)}}}}
	var e exposures
	now := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	if !e.note(public, now) || e.note(public, now.Add(time.Second)) {
		t.Fatal("note does not report the first exposure of a target exactly once")
	}
	e.note(cdn, now)
	if e.note(signedT, now) {
		t.Fatal("a signed target was recorded")
	}
	w := e.warnings(public)
	if len(w) != 1 || !strings.Contains(w[0], "2 requests") || !strings.Contains(w[0], "not signed") ||
		!strings.Contains(w[0], "2026-11-24T12:00:01Z") {
		t.Fatalf("public target warnings: %q", w)
	}
	if len(e.warnings(cdn)) != 1 {
		t.Fatalf("a CDN target raises no warning")
	}
	if len(e.warnings(signedT)) != 0 {
		t.Fatal("a signed target has a warning")
	}
	// The operator fixes it: the same target, now with signed URLs.
	fixed := &pb.Target{Name: "pub", Uid: "u1", UrlForm: signedT.UrlForm}
	if len(e.warnings(fixed)) != 0 {
		t.Fatal("a target made signed still warns")
	}
	// Another target of the same name (deleted and created again) is another target.
	if len(e.warnings(&pb.Target{Name: "pub", Uid: "u9", UrlForm: public.UrlForm})) != 0 {
		t.Fatal("a new target inherits the warning of a deleted one of the same name")
	}
}
