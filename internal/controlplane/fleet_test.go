package controlplane

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/pki"
	"github.com/detourhq/detour/internal/testbed"
)

func listAgents(t *testing.T, admin pb.AdminServiceClient) *pb.ListAgentsResponse {
	t.Helper()
	l, err := admin.ListAgents(context.Background(), &pb.ListAgentsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func agentIn(l *pb.ListAgentsResponse, id string) *pb.Agent {
	for _, a := range l.Agents {
		if a.Id == id {
			return a
		}
	}
	return nil
}

// An agent registers under its certificate's identity and no other; read-only operators list
// agents; a record whose agent stops refreshing it goes when its lease ends.
func TestAgentsRegisterOnlyAsThemselvesAndExpire(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	ctx := context.Background()
	dev := testbed.PKI(t)
	self := pki.AgentPrefix + "dev"

	_, err := r.place.RegisterAgent(ctx, &pb.RegisterAgentRequest{Id: pki.AgentPrefix + "someone-else", Region: "us"})
	if code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "someone-else") {
		t.Fatalf("registering under a foreign id: %v, want PermissionDenied", err)
	}
	if n := metric(t, r, "detour_auth_rejections_total", "reason", "foreign_agent_id"); n != 1 {
		t.Fatalf("foreign_agent_id rejections: %v", n)
	}
	mirror := pb.NewPlacementServiceClient(testbed.Dial(t, r.addr(), dev.Mirror))
	if _, err := mirror.RegisterAgent(ctx, &pb.RegisterAgentRequest{Region: "us"}); code(err) != codes.PermissionDenied {
		t.Fatalf("a mirror registering as an agent: %v, want PermissionDenied", err)
	}
	if _, err := r.place.RegisterAgent(ctx, &pb.RegisterAgentRequest{Ttl: durationpb.New(time.Second)}); code(err) != codes.InvalidArgument {
		t.Fatalf("ttl under the minimum: %v, want InvalidArgument", err)
	}

	resp, err := r.place.RegisterAgent(ctx, &pb.RegisterAgentRequest{Id: self, Name: "host-1", Region: "us", Version: "v1.2.3",
		AppliedRevision: 7, LocationCacheEntries: 42, Ttl: durationpb.New(2 * time.Second),
		StoreBytes: 900, OriginBytes: 100, FilledBytes: 300})
	if err != nil || resp.Id != self {
		t.Fatalf("register: %v %v", resp, err)
	}
	reader := pb.NewAdminServiceClient(testbed.Dial(t, r.addr(), dev.Reader))
	a := agentIn(listAgents(t, reader), self)
	if a == nil || a.Name != "host-1" || a.Region != "us" || a.Version != "v1.2.3" || a.LocationCacheEntries != 42 || a.Refreshed == nil ||
		a.StoreBytes != 900 || a.OriginBytes != 100 || a.FilledBytes != 300 {
		t.Fatalf("listed agent: %v", a)
	}
	if n := metric(t, r, "detour_agents_registered"); n != 1 {
		t.Fatalf("detour_agents_registered = %v", n)
	}
	eventually(t, 10*time.Second, "the agent's record expiring", func() bool { return agentIn(listAgents(t, r.admin), self) == nil })
}

// An agent whose applied revision misses a target-set change for longer than the threshold is
// flagged, in the list and the metric, until it reports the change applied.
func TestLaggingAgentsAreFlagged(t *testing.T) {
	t.Parallel()
	r := startReplicaWith(t, Options{WriteTimeout: time.Second,
		AgentLagThreshold: 300 * time.Millisecond})
	ctx := context.Background()
	self := pki.AgentPrefix + "dev"
	register := func(applied int64) {
		t.Helper()
		if _, err := r.place.RegisterAgent(ctx, &pb.RegisterAgentRequest{Region: "us", AppliedRevision: applied}); err != nil {
			t.Fatal(err)
		}
	}
	l := listAgents(t, r.admin)
	register(l.TargetsRevision)
	if a := agentIn(listAgents(t, r.admin), self); a == nil || a.Lagging || a.BehindFor != nil {
		t.Fatalf("a current agent: %v", a)
	}
	createTargets(t, r, target(t, "us-a", "us"))
	eventually(t, 10*time.Second, "the agent flagged lagging", func() bool {
		a := agentIn(listAgents(t, r.admin), self)
		return a != nil && a.Lagging && a.BehindFor.AsDuration() > 300*time.Millisecond
	})
	if n := metric(t, r, "detour_agents_lagging"); n != 1 {
		t.Fatalf("detour_agents_lagging = %v", n)
	}
	register(listAgents(t, r.admin).TargetsRevision)
	if a := agentIn(listAgents(t, r.admin), self); a == nil || a.Lagging {
		t.Fatalf("after catching up: %v", a)
	}
	if n := metric(t, r, "detour_agents_lagging"); n != 0 {
		t.Fatalf("detour_agents_lagging after catching up = %v", n)
	}
}

func explain(t *testing.T, r *replica, k, region string, accepted ...string) *pb.ExplainResponse {
	t.Helper()
	resp, err := r.admin.Explain(context.Background(), &pb.ExplainRequest{Key: k, AgentRegion: region, AcceptedTargets: accepted})
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func explainedCopy(resp *pb.ExplainResponse, target string) *pb.ExplainedCopy {
	for _, c := range resp.Copies {
		if c.Target == target {
			return c
		}
	}
	return nil
}

// Explain gives Place's answer for a hit, a drain and a cross-region failover, with the steps that
// lead there, and writes nothing.
func TestExplainShowsPlacesDecisionAndWhy(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	createTargets(t, r, target(t, "us-a", "us"), target(t, "eu-a", "eu"))
	setPolicy(t, r, func(p *pb.Policy) { p.MinOccurrences = 1 }) // admission: TestExplainShowsAdmission
	k := key(1)

	// A miss in a region without a target of its own fails over to the other region's.
	miss := explain(t, r, k, "ap", "us-a", "eu-a")
	if miss.Result != pb.PlaceResult_PLACE_RESULT_INLINE || miss.Reason != "fill_remote" || miss.FillTarget == "" || len(miss.Targets) != 2 {
		t.Fatalf("miss from ap: %v", miss)
	}
	if n := len(copiesAt(t, r, "", k)); n != 0 {
		t.Fatalf("explain wrote %d copies", n)
	}
	fill(t, r, k, []string{"us-a"}, "us")
	waitRedirect(t, r, k, "us-a") // a report does not wait for this replica's snapshot
	// Cross-region redirects count toward an in-region copy; Explain shows the count, and does
	// not add to it.
	for i := 0; i < 2; i++ {
		placeIn(t, r, "eu", k, "us-a", "eu-a")
	}
	for i := 0; i < 2; i++ {
		if cross := explain(t, r, k, "eu"); cross.Target != "us-a" || cross.CrossRegionRedirects != 2 || cross.CrossRegionCopyThreshold != 10 {
			t.Fatalf("cross-region hit: %v", cross)
		}
	}
	fill(t, r, k, []string{"eu-a"}, "eu")

	// A hit: each region is sent to its own copy, the other ranked second as remote.
	for _, region := range []string{"us", "eu"} {
		hit := explain(t, r, k, region)
		if hit.Result != pb.PlaceResult_PLACE_RESULT_REDIRECT || hit.Target != region+"-a" || len(hit.AcceptedTargets) != 2 {
			t.Fatalf("hit from %s: %v", region, hit)
		}
		if c := explainedCopy(hit, region+"-a"); c == nil || c.Rank != 1 || c.Remote || c.Score <= 0 {
			t.Fatalf("hit from %s, own copy: %v", region, c)
		}
		if place := placeIn(t, r, region, k, "us-a", "eu-a"); place.Target != hit.Target {
			t.Fatalf("Place sent %s to %s, Explain says %s", region, place.Target, hit.Target)
		}
	}

	// A drain: the draining copy ranks last, and the other region's copy serves.
	setState(t, r, "us-a", pb.TargetState_TARGET_STATE_DRAINING)
	drained := explain(t, r, k, "us")
	if drained.Target != "eu-a" {
		t.Fatalf("with us-a draining: %v", drained)
	}
	if c := explainedCopy(drained, "us-a"); c == nil || !c.Kept || !c.Draining || c.Rank != 2 {
		t.Fatalf("the draining copy: %v", c)
	}
	// Disabled: the copy is dropped, and says why.
	setState(t, r, "us-a", pb.TargetState_TARGET_STATE_DISABLED)
	off := explain(t, r, k, "us")
	if c := explainedCopy(off, "us-a"); c == nil || c.Kept || c.Dropped != "disabled" {
		t.Fatalf("the disabled copy: %v", c)
	}
	if !strings.Contains(strings.Join(off.Steps, "\n"), "redirect to eu-a") {
		t.Fatalf("steps:\n%s", strings.Join(off.Steps, "\n"))
	}
	if _, err := r.admin.Explain(context.Background(), &pb.ExplainRequest{Key: "nope"}); code(err) != codes.InvalidArgument {
		t.Fatalf("a malformed key: %v", err)
	}
}

// Explain shows how far a key is from fill admission, as counted by this replica's Place, and
// does not count itself.
func TestExplainShowsAdmission(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	createTargets(t, r, target(t, "us-a", "us"))
	setPolicy(t, r, func(p *pb.Policy) { p.MinOccurrences = 3 })
	k := key(7)
	for misses := uint32(0); misses < 3; misses++ {
		for range 2 { // twice: explaining counts nothing
			e := explain(t, r, k, "us")
			if e.AdmissionCount != misses || e.MinOccurrences != 3 {
				t.Fatalf("after %d misses: admission %d of %d", misses, e.AdmissionCount, e.MinOccurrences)
			}
			admitted := misses+1 >= 3
			if admitted != (e.FillTarget == "us-a") || admitted == (e.Reason == ReasonNotAdmitted) {
				t.Fatalf("after %d misses: fill target %q, reason %q", misses, e.FillTarget, e.Reason)
			}
		}
		p := placeIn(t, r, "us", k, "us-a")
		if got, want := p.Fill != nil, misses == 2; got != want {
			t.Fatalf("miss %d: granted a fill %v, Explain said %v", misses+1, got, want)
		}
	}
}

// Without client certificates there are no identities: an agent is registered under the id it
// gives, or else its name.
func TestAgentsRegisterOnAPlaintextControlPlane(t *testing.T) {
	t.Parallel()
	r := startReplicaWith(t, Options{WriteTimeout: time.Second, Insecure: true})
	conn, err := grpc.NewClient(r.addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	place, ctx := pb.NewPlacementServiceClient(conn), context.Background()
	if _, err := place.RegisterAgent(ctx, &pb.RegisterAgentRequest{Region: "us"}); code(err) != codes.InvalidArgument {
		t.Fatalf("no id and no name: %v, want InvalidArgument", err)
	}
	if resp, err := place.RegisterAgent(ctx, &pb.RegisterAgentRequest{Name: "host-1"}); err != nil || resp.Id != "host-1" {
		t.Fatalf("by name: %v %v", resp, err)
	}
	if agentIn(listAgents(t, pb.NewAdminServiceClient(conn)), "host-1") == nil {
		t.Fatal("the agent registered by name is not listed")
	}
}
