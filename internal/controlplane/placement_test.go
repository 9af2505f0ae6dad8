package controlplane

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// The control plane keeps no protocol of its own: a fill is granted, verified and redirected to
// as the media type the Place request names (application/mercurial-cbor when it names none), a
// report must repeat the granted one, and the command is an optional label. Malformed values are
// refused naming the field, and nothing is written.
// Serial: it checks that etcd's revision under its prefix does not move, and a janitor's
// verdict written late under a parallel load would move it.
func TestFillsAreStoredAsTheRequestSays(t *testing.T) {
	r := startReplica(t)
	createTargets(t, r, target(t, "us-a", "us"))
	setPolicy(t, r, func(p *pb.Policy) { p.MinOccurrences = 1 })
	ctx := context.Background()
	place := func(k, mediaType, command string) (*pb.PlaceResponse, error) {
		return r.place.Place(ctx, &pb.PlaceRequest{Key: k, MediaType: mediaType, Command: command, AcceptedTargets: []string{"us-a"},
			AgentRegion: "us", AgentId: "a1"})
	}

	before := r.srv.w.Snapshot().Revision
	for _, c := range []struct{ field, mediaType, command string }{
		{"media_type", "application", ""},
		{"media_type", "/cbor", ""},
		{"media_type", "application/", ""},
		{"media_type", "application/x;charset=utf-8", ""},
		{"media_type", "application/x y", ""},
		{"media_type", "application/x\n", ""},
		{"media_type", "+x/y", ""},
		{"media_type", "application/" + strings.Repeat("x", 116), ""},
		{"command", "", strings.Repeat("c", 129)},
	} {
		if _, err := place(key(1), c.mediaType, c.command); code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), c.field) {
			t.Errorf("media type %.40q, command of %d bytes: %v, want InvalidArgument naming %s", c.mediaType, len(c.command), err, c.field)
		}
	}
	if got := r.srv.w.Snapshot().Revision; got != before {
		t.Fatalf("refused requests wrote to etcd (revision %d → %d)", before, got)
	}

	// No media type, no command: a fill as an agent before the field asks for it.
	old, err := place(key(1), "", "")
	if err != nil || old.Fill == nil || old.Fill.MediaType != MediaTypeCBOR {
		t.Fatalf("a request without a media type: %v %v, want a fill as %s", old, err, MediaTypeCBOR)
	}

	// Another protocol's media type, at the longest allowed, with RFC 6838's other characters.
	const bundle = "application/x-hg.bundle+v2_test"
	long := "application/" + strings.Repeat("x", 115)
	for _, mediaType := range []string{bundle, long} {
		if _, err := place(key(9), mediaType, "clonebundle"); err != nil {
			t.Fatalf("media type %.40q: %v", mediaType, err)
		}
	}
	g := grantAs(t, r, key(2), bundle)
	if g.MediaType != bundle {
		t.Fatalf("granted as %q, want %q", g.MediaType, bundle)
	}
	data := []byte(strings.Repeat("bundle bytes\n", 100))
	if _, err := r.place.ReportFill(ctx, report(key(2), g, upload(t, g, key(2), data))); err != nil {
		t.Fatal(err)
	}
	resp := waitRedirect(t, r, key(2), "us-a")
	if resp.Location.MediaType != bundle || httpGet(t, resp.Location.Url) != string(data) {
		t.Fatalf("redirect %v, want %s", resp.Location, bundle)
	}

	// A report must name the media type the fill was granted as.
	g = grantAs(t, r, key(3), bundle)
	res := upload(t, g, key(3), data)
	lie := report(key(3), g, res)
	lie.MediaType = MediaTypeCBOR
	if _, err := r.place.ReportFill(ctx, lie); code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "media_type") {
		t.Fatalf("a report naming another media type: %v", err)
	}
}

// grantAs asks until Place grants a fill of k as mediaType.
func grantAs(t *testing.T, r *replica, k, mediaType string) *pb.FillGrant {
	t.Helper()
	var g *pb.FillGrant
	eventually(t, 5*time.Second, "a fill grant", func() bool {
		resp, err := r.place.Place(context.Background(), &pb.PlaceRequest{Key: k, MediaType: mediaType, AcceptedTargets: []string{"us-a"},
			AgentRegion: "us", AgentId: "a1"})
		if err != nil {
			t.Fatal(err)
		}
		g = resp.Fill
		return g != nil
	})
	return g
}

// A reconnecting agent resumes from the revision it last applied: when the target set is
// unchanged since and the invalidations since are all held, the stream's first message is the
// target set marked resumed at that revision, followed by exactly the invalidations after it, so
// the agent keeps what it cached. A target change since, a replica that loaded after that revision,
// or no revision at all give an ordinary target set.
func TestWatchTargetsResumesFromARevision(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	createTargets(t, r, target(t, "us-a", "us"))
	for _, k := range []string{key(1), key(2)} {
		fill(t, r, k, []string{"us-a"}, "us")
		waitRedirect(t, r, k, "us-a")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	watch := func(resume int64) (pb.PlacementService_WatchTargetsClient, context.CancelFunc) {
		t.Helper()
		sctx, stop := context.WithCancel(ctx)
		stream, err := r.place.WatchTargets(sctx, &pb.WatchTargetsRequest{AgentRegion: "us", ResumeRevision: resume})
		if err != nil {
			t.Fatal(err)
		}
		return stream, stop
	}
	recv := func(stream pb.PlacementService_WatchTargetsClient) *pb.WatchTargetsResponse {
		t.Helper()
		msg, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		return msg
	}
	invalidated := func(msg *pb.WatchTargetsResponse, k string) bool {
		for _, x := range msg.Invalidations {
			if x.Key == k {
				return true
			}
		}
		return false
	}
	purge := func(k string) {
		t.Helper()
		if _, err := r.admin.DeleteObjects(ctx, &pb.DeleteObjectsRequest{Key: k}); err != nil {
			t.Fatal(err)
		}
	}

	// The agent applies the target set, then key(1)'s purge, and disconnects.
	first, stop := watch(0)
	msg := recv(first)
	if msg.Resumed || len(msg.Targets) != 1 {
		t.Fatalf("a stream without a revision to resume from: %v", msg)
	}
	purge(key(1))
	for !invalidated(msg, key(1)) {
		msg = recv(first)
	}
	applied := msg.Revision
	stop()
	// While it is away, key(2) is purged.
	purge(key(2))

	resumed, stop := watch(applied)
	msg = recv(resumed)
	if !msg.Resumed || len(msg.Targets) != 1 || msg.Targets[0].Name != "us-a" || !msg.Targets[0].Healthy {
		t.Fatalf("resuming from %d: %v", applied, msg)
	}
	// The invalidations since come in the same message, so the agent never holds a redirect
	// valid that a missed invalidation ends.
	if msg.InvalidationsOnly || msg.Flush || !invalidated(msg, key(2)) || invalidated(msg, key(1)) || msg.Revision <= applied {
		t.Fatalf("resuming from %d: %v, want key(2)'s invalidation alone with the target set", applied, msg)
	}
	for _, x := range msg.Invalidations {
		if x.Revision <= applied {
			t.Errorf("an invalidation at %d, not after %d", x.Revision, applied)
		}
	}
	stop()
	if got := metric(t, r, "detour_watch_streams_total", `start="resumed"`); got != 1 {
		t.Errorf("%v resumed streams counted, want 1", got)
	}

	// A replica that loaded after that revision cannot vouch for what changed before its load.
	other := startReplica(t)
	stream, err := other.place.WatchTargets(ctx, &pb.WatchTargetsRequest{AgentRegion: "us", ResumeRevision: applied})
	if err != nil {
		t.Fatal(err)
	}
	if msg, err := stream.Recv(); err != nil || msg.Resumed || msg.Revision <= applied {
		t.Fatalf("resuming on a replica that loaded later: %v %v", msg, err)
	}

	// The target set changed since: an ordinary target set.
	createTargets(t, r, target(t, "eu-a", "eu"))
	changed, stop := watch(applied)
	defer stop()
	if msg := recv(changed); msg.Resumed || len(msg.Targets) != 2 || msg.Revision <= applied {
		t.Fatalf("resuming across a target change: %v", msg)
	}

	bad, stop := watch(-1)
	defer stop()
	if _, err := bad.Recv(); code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "resume_revision") {
		t.Fatalf("a negative revision: %v", err)
	}
}
