package agent

import (
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// A Place answer decided on a snapshot older than an invalidation the agent has already applied
// for its key is not cached (it may name the record that invalidation removed); one decided after
// it is. Nothing is cached before a target set has arrived, nor after the stream is lost.
func TestCacheRefusesAnswersOlderThanAnInvalidationItApplied(t *testing.T) {
	c := newLocationCache(10, time.Minute, newMetrics())
	now := time.Now()
	answer := func(rev int64) *pb.PlaceResponse {
		return &pb.PlaceResponse{Target: "t", SnapshotRevision: rev, CacheFor: durationpb.New(time.Minute),
			Location: &pb.Location{Url: "http://t/k"}}
	}
	put := func(key string, rev int64) bool {
		resp := answer(rev)
		c.put(key, locationOf(resp), resp, now)
		_, ok := c.get(key, []string{"t"}, now)
		return ok
	}
	if put("k", 5) {
		t.Fatal("cached before any target set arrived")
	}
	c.apply(&pb.WatchTargetsResponse{Revision: 5})
	c.apply(&pb.WatchTargetsResponse{Revision: 10, InvalidationsOnly: true,
		Invalidations: []*pb.Invalidation{{Key: "k", Target: "t", Revision: 10}}})
	if put("k", 9) {
		t.Fatal("an answer from revision 9 was cached after an invalidation of its key at 10")
	}
	if !put("other", 9) {
		t.Fatal("an answer for another key was refused")
	}
	if put("k", 4) {
		t.Fatal("an answer from before the target set was cached")
	}
	if !put("k", 10) {
		t.Fatal("an answer from the invalidation's revision was refused")
	}
	c.lost()
	if _, ok := c.get("k", []string{"t"}, now); ok {
		t.Fatal("an entry answered while the stream is lost")
	}
	if put("k", 11) {
		t.Fatal("cached while the stream is lost")
	}
	// A stream that resumes brings what was missed with it: the entries it does not name answer
	// again, the ones it names are gone.
	c.apply(&pb.WatchTargetsResponse{Revision: 12, Resumed: true,
		Invalidations: []*pb.Invalidation{{Key: "other", Target: "t", Revision: 12}}})
	if _, ok := c.get("k", []string{"t"}, now); !ok {
		t.Fatal("a resumed stream dropped an entry it did not invalidate")
	}
	if _, ok := c.get("other", []string{"t"}, now); ok {
		t.Fatal("an entry invalidated while the stream was lost answered after it resumed")
	}
	// One that does not resume starts with a target set, which ends every entry.
	c.lost()
	c.apply(&pb.WatchTargetsResponse{Revision: 13})
	if _, ok := c.get("k", []string{"t"}, now); ok {
		t.Fatal("an entry survived a stream that did not resume")
	}
}
