package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/front/hgv2"
	"github.com/detourhq/detour/internal/testbed"
)

// growthShape is a repository that grows between clones (testdata/grow.py): a first changeset of
// text files (and binary files), then changesets that each edit a few text files.
type growthShape struct {
	name        string
	changesets  int // before it grows
	files       int // text files of the first changeset, of lines lines
	lines       int
	big         int // binary files of the first changeset, of bigSize random bytes
	bigSize     int
	edits, adds int // files each later changeset edits, lines each edit inserts
}

// The growing repositories of issue 17: a small one of a few dozen changesets, and a larger one
// with over 10 MB of file data.
var (
	smallGrowing  = growthShape{name: "small", changesets: 40, files: 400, lines: 160, edits: 3, adds: 8}
	largerGrowing = growthShape{name: "larger", changesets: 150, files: 400, lines: 60, big: 5, bigSize: 2 << 20, edits: 3, adds: 8}
)

// growthSteps are the changesets added before each clone after the cold one: the cache is warm
// from the clone before, so each is the number of new changesets since the cache was warm.
var growthSteps = []int{1, 10, 100}

// newGrowthRig is a rig whose origin holds a repository of shape, with the agent's defaults
// (batch sizes following the repository's size) and its fleet report every second.
func newGrowthRig(t testing.TB, shape growthShape) *rig {
	t.Helper()
	r := newBareRigOf(t, func(r *rig) { r.grow(shape, shape.changesets, 1) }, "--region", "test")
	r.addTarget(target, bucket, "test")
	r.agentFlags = []string{"--register-interval", "1s"}
	r.agent, r.agentTap = r.startAgent("test", target)
	return r
}

// grow adds count changesets to the origin's repository, in one hg process.
func (r *rig) grow(shape growthShape, count, seed int) {
	r.t.Helper()
	ext, err := filepath.Abs(filepath.Join("testdata", "grow.py"))
	r.must(err)
	r.hgOrigin("--config", "extensions.grow="+ext, "grow", strconv.Itoa(count), "--seed", strconv.Itoa(seed),
		"--files", strconv.Itoa(shape.files), "--lines", strconv.Itoa(shape.lines), "--big", strconv.Itoa(shape.big),
		"--bigsize", strconv.Itoa(shape.bigSize), "--edits", strconv.Itoa(shape.edits), "--add", strconv.Itoa(shape.adds))
}

// originBytes returns what the origin sent while fn ran.
func (r *rig) originBytes(fn func()) int64 {
	before := r.originTap.responseBytes.Load()
	fn()
	return r.originTap.responseBytes.Load() - before
}

// stored returns the objects the index holds and their bytes.
func (r *rig) stored() (objects int, bytes uint64) {
	r.t.Helper()
	for _, o := range r.storedObjects() {
		objects++
		bytes += o.Size
	}
	return objects, bytes
}

// storedObjects lists every object the index holds.
func (r *rig) storedObjects() []*pb.StoredObject {
	r.t.Helper()
	var out []*pb.StoredObject
	req := &pb.ListObjectsRequest{PageSize: 1000}
	for {
		list, err := r.admin.ListObjects(context.Background(), req)
		r.must(err)
		out = append(out, list.Objects...)
		if list.NextPageToken == "" {
			return out
		}
		req.PageToken = list.NextPageToken
	}
}

// lifetimes counts the stored objects of each lifetime class: transient ones (the agent marked
// them likely superseded soon: batches that are not full) and the others.
func (r *rig) lifetimes() (transient, ordinary int) {
	r.t.Helper()
	for _, o := range r.storedObjects() {
		if o.Transient {
			transient++
		} else {
			ordinary++
		}
	}
	return transient, ordinary
}

// batches is how many batches of size b a list of n items is cut into.
func batches(n int, b uint64) int { return int((uint64(n) + b - 1) / b) }

// TestRealMercurialClonesOfGrowingRepositories: repositories grow on the origin by 1, 10 and 100
// changesets between clones through the agent, with the agent's default batch sizes. The cold
// clone costs the origin at most 1.05 times a direct clone (the agent asks for the encoding the
// client accepts, learns the repository's size before the first handshake, and its batches cost
// a few percent); after 1 new changeset a clone costs at most 2 % of a direct clone (only the
// newest batches and the repository's state go back to the origin); after 100, at most twice what
// pulling those 100 from the origin costs. Every clone is identical to the origin's, verifies, and
// a clone made before the growth pulls through the agent to the same state. The agent's offload
// reaches the fleet view.
func TestRealMercurialClonesOfGrowingRepositories(t *testing.T) {
	for _, shape := range []growthShape{smallGrowing, largerGrowing} {
		t.Run(shape.name, func(t *testing.T) {
			t.Parallel()
			start := time.Now()
			r := newGrowthRig(t, shape)
			n := shape.changesets

			var ref string
			direct := r.originBytes(func() { ref, _ = r.clone(r.originTap.URL) })
			want := r.state(ref)

			var cold, out string
			coldBytes := r.originBytes(func() { cold, out = r.clone(r.agentTap.URL) })
			t.Logf("%s, %d changesets: direct clone %d origin bytes; cold clone through the agent %d (%.3f)",
				shape.name, n, direct, coldBytes, float64(coldBytes)/float64(direct))
			if float64(coldBytes) > 1.05*float64(direct) {
				t.Errorf("the cold clone cost the origin %d bytes, over 1.05 times a direct clone's %d", coldBytes, direct)
			}
			// The first handshake already carried the repository's batch size.
			b := hgv2.BatchSizeFor(int64(n))
			if got, wantN := strings.Count(out, "sending command filesdata"), batches(n, b); got != wantN {
				t.Errorf("the cold clone of %d changesets sent %d filesdata batches, want %d (batch size %d)", n, got, wantN, b)
			}
			assertSame(t, "cold clone", want, r.state(cold))
			r.waitFills()
			// Each command's full batches are stored for the object TTL, its last, partial batch
			// (which the next push re-keys) for the transient TTL.
			checkLifetimes := func(n int) {
				t.Helper()
				partial := 0
				if uint64(n)%b != 0 {
					partial = 2
				}
				if tr, ord := r.lifetimes(); tr < partial || ord != 2*(n/int(b)) {
					t.Errorf("%d changesets in batches of %d: %d transient and %d ordinary objects stored, want %d partial batches among the transient ones and %d full ones",
						n, b, tr, ord, partial, 2*(n/int(b)))
				}
			}
			checkLifetimes(n)

			for i, added := range growthSteps {
				r.grow(shape, added, 10+i)
				n += added
				pull := r.originBytes(func() {
					_, err := r.hgIn(ref, "pull", "--update", r.originTap.URL)
					r.must(err)
				})
				want = r.state(ref)
				var dir string
				took, by := time.Now(), r.originTap.BytesBy()
				cost := r.originBytes(func() { dir, out = r.clone(r.agentTap.URL) })
				took2 := time.Since(took)
				objects, bytes := r.stored()
				t.Logf("%s +%d (%d changesets): clone through the agent %d origin bytes (%.4f of a direct clone, %.2f of a pull of %d at %d bytes; by command %v), %d redirects, %s; %d objects, %d bytes stored",
					shape.name, added, n, cost, float64(cost)/float64(direct), float64(cost)/float64(pull), added, pull,
					bytesSince(by, r.originTap.BytesBy()), redirectsFollowed(out), took2.Round(10*time.Millisecond), objects, bytes)
				assertSame(t, fmt.Sprintf("clone after %d new changesets", added), want, r.state(dir))
				switch added {
				case 1:
					if float64(cost) > 0.02*float64(direct) {
						t.Errorf("after 1 new changeset a clone cost the origin %d bytes, over 2%% of a direct clone's %d", cost, direct)
					}
				case 100:
					if cost > 2*pull {
						t.Errorf("after 100 new changesets a clone cost the origin %d bytes, over twice a pull of them (%d)", cost, pull)
					}
					r.verify(dir)
				}
				r.waitFills()
				checkLifetimes(n)
			}
			// The clone made before the growth pulls it through the agent.
			_, err := r.hgIn(cold, "pull", "--update", r.agentTap.URL)
			r.must(err)
			assertSame(t, "pull through the agent", want, r.state(cold))
			r.verify(cold)

			// The offload reaches the metrics and the fleet view.
			if got := r.agentMetric("detour_agent_response_bytes_total", `command="filesdata"`, `source="store"`); got <= 0 {
				t.Errorf("no filesdata bytes counted as served by the store")
			}
			testbed.Eventually(t, 10*time.Second, "the agent's offload in the fleet view", func() bool {
				list, err := r.admin.ListAgents(context.Background(), &pb.ListAgentsRequest{})
				r.must(err)
				for _, a := range list.Agents {
					if a.StoreBytes > 0 && a.OriginBytes > 0 && a.FilledBytes > 0 {
						t.Logf("%s: fleet view: store %d, origin %d, filled %d bytes: offload %.3f", shape.name,
							a.StoreBytes, a.OriginBytes, a.FilledBytes, float64(a.StoreBytes)/float64(a.StoreBytes+a.OriginBytes))
						return true
					}
				}
				return false
			})
			t.Logf("%s: wall time %s", shape.name, time.Since(start).Round(100*time.Millisecond))
		})
	}
}
