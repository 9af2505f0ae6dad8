package controlplane

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// skewedClock is time.Now moved forward by what the test adds: objects' expiries come and go
// without waiting for them.
type skewedClock struct{ skew atomic.Int64 }

func (c *skewedClock) now() time.Time          { return time.Now().Add(time.Duration(c.skew.Load())) }
func (c *skewedClock) advance(d time.Duration) { c.skew.Add(int64(d)) }

// fillAs runs one Place → upload → ReportFill cycle for a request marked transient or not, and
// returns the grant and the READY record the report answers with.
func fillAs(t *testing.T, r *replica, k string, transient bool) (*pb.FillGrant, *pb.StoredObject) {
	t.Helper()
	ctx := context.Background()
	var g *pb.FillGrant
	eventually(t, 5*time.Second, "a fill grant", func() bool {
		resp, err := r.place.Place(ctx, &pb.PlaceRequest{Key: k, Command: "filesdata", AcceptedTargets: []string{"us-a"},
			AgentRegion: "us", AgentId: "a1", Transient: transient})
		if err != nil {
			t.Fatal(err)
		}
		g = resp.Fill
		return g != nil
	})
	rep, err := r.place.ReportFill(ctx, report(k, g, upload(t, g, k, []byte(strings.Repeat(k, 40)))))
	if err != nil {
		t.Fatal(err)
	}
	return g, rep.Object
}

// listed is k's record at us-a as the replica's snapshot has it (nil: none).
func listed(t *testing.T, r *replica, k string) *pb.StoredObject {
	t.Helper()
	resp, err := r.admin.ListObjects(context.Background(), &pb.ListObjectsRequest{KeyPrefix: k})
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range resp.Objects {
		if o.Key == k && o.Target == "us-a" {
			return o
		}
	}
	return nil
}

func lifetime(o *pb.StoredObject) time.Duration { return o.Expires.AsTime().Sub(o.Created.AsTime()) }

// A fill its agent marked transient (a growing repository's newest batch) is kept for the
// transient TTL, is extended by it and never by the object TTL, and is swept once that passes; a
// fill not so marked keeps the object TTL. The lifetime class survives the record's round trip
// through etcd and the snapshot.
func TestTransientObjectsLiveByTheTransientTTL(t *testing.T) {
	t.Parallel()
	clock := &skewedClock{}
	r := startReplicaWith(t, Options{Now: clock.now, Janitor: JanitorConfig{ProbeInterval: 100 * time.Millisecond,
		ProbeTimeout: 2 * time.Second, SweepInterval: 200 * time.Millisecond, ReconcileInterval: time.Hour,
		ExtendInterval: 200 * time.Millisecond, GarbageGrace: 100 * time.Millisecond}})
	ctx := context.Background()
	createTargets(t, r, target(t, "us-a", "us"))
	short, long := key(1), key(2)

	g, obj := fillAs(t, r, short, true)
	if !obj.Transient || lifetime(obj) != DefaultTransientObjectTTL {
		t.Fatalf("transient fill: transient=%v, kept for %s; want %s", obj.Transient, lifetime(obj), DefaultTransientObjectTTL)
	}
	_, normal := fillAs(t, r, long, false)
	if normal.Transient || lifetime(normal) != DefaultObjectTTL {
		t.Fatalf("ordinary fill: transient=%v, kept for %s; want %s", normal.Transient, lifetime(normal), DefaultObjectTTL)
	}
	eventually(t, 5*time.Second, "both records in the snapshot", func() bool {
		s, l := listed(t, r, short), listed(t, r, long)
		return s != nil && l != nil && s.Transient && !l.Transient && s.Expires.AsTime().Equal(obj.Expires.AsTime())
	})

	// 7 hours on, less than three quarters of the transient TTL remain: a redirect extends the
	// object, by the transient TTL. The ordinary object is far from expiry and is not extended.
	clock.advance(7 * time.Hour)
	waitRedirect(t, r, short, "us-a")
	waitRedirect(t, r, long, "us-a")
	var extended *pb.StoredObject
	eventually(t, 5*time.Second, "the transient object extended", func() bool {
		extended = listed(t, r, short)
		return extended != nil && extended.Expires.AsTime().After(obj.Expires.AsTime())
	})
	if !extended.Transient {
		t.Fatal("the extension dropped the lifetime class")
	}
	if got := extended.Expires.AsTime().Sub(obj.Created.AsTime()); got < 7*time.Hour+DefaultTransientObjectTTL || got > 8*time.Hour+DefaultTransientObjectTTL {
		t.Fatalf("extended to %s after the fill; want 7h (the clock) + the transient TTL, not the object TTL", got)
	}
	if l := listed(t, r, long); !l.Expires.AsTime().Equal(normal.Expires.AsTime()) {
		t.Fatalf("the ordinary object was extended early: %v", l.Expires.AsTime())
	}

	// Past the extended expiry the sweep retires the transient object and deletes its bytes; the
	// ordinary one stays.
	clock.advance(DefaultTransientObjectTTL + 2*time.Hour)
	eventually(t, 5*time.Second, "the transient object swept", func() bool { return listed(t, r, short) == nil })
	eventually(t, 5*time.Second, "its bytes deleted", func() bool {
		_, err := sharedEnv(t).gcs.Object(g.Bucket, g.ObjectName)
		return err != nil
	})
	if placeKey(t, r, short, "us-a").Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatal("a redirect to an expired transient object")
	}
	if listed(t, r, long) == nil || placeKey(t, r, long, "us-a").Result != pb.PlaceResult_PLACE_RESULT_REDIRECT {
		t.Fatal("the ordinary object went with the transient one")
	}

	// The policy sets the transient TTL; a shorter object TTL bounds it; out-of-range values are
	// refused naming the field.
	for i, c := range []struct {
		objectTTL, transientTTL, want time.Duration
	}{
		{0, 2 * time.Hour, 2 * time.Hour},
		{time.Hour, 0, time.Hour},
	} {
		p := &pb.Policy{}
		if c.objectTTL != 0 {
			p.ObjectTtl = durationpb.New(c.objectTTL)
		}
		if c.transientTTL != 0 {
			p.TransientObjectTtl = durationpb.New(c.transientTTL)
		}
		cur, err := r.admin.GetPolicy(ctx, &pb.GetPolicyRequest{})
		if err != nil {
			t.Fatal(err)
		}
		p.Revision = cur.Policy.Revision
		if _, err := r.admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: p}); err != nil {
			t.Fatal(err)
		}
		if _, err := r.admin.GetPolicy(ctx, &pb.GetPolicyRequest{}); err != nil { // until the snapshot has it
			t.Fatal(err)
		}
		k := key(10 + i)
		if _, o := fillAs(t, r, k, true); lifetime(o) != c.want {
			t.Errorf("object_ttl %s, transient_object_ttl %s: a transient fill kept for %s, want %s", c.objectTTL, c.transientTTL, lifetime(o), c.want)
		}
	}
	for _, bad := range []*pb.Policy{{TransientObjectTtl: durationpb.New(-time.Hour)},
		{ObjectTtl: durationpb.New(time.Hour), TransientObjectTtl: durationpb.New(2 * time.Hour)}} {
		if _, err := r.admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: bad}); code(err) != codes.InvalidArgument ||
			!strings.Contains(err.Error(), "policy.transient_object_ttl") {
			t.Errorf("policy %v: %v; want InvalidArgument naming policy.transient_object_ttl", bad, err)
		}
	}
}
