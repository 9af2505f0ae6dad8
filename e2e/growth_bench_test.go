package e2e

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/front/hgv2"
	"github.com/detourhq/detour/internal/hgserve"
)

// longGrowing is a repository with a longer history, for the figures: its batch size is above the
// minimum, and its clones' changesetdata (always the origin's) outweighs a pull of 100.
var longGrowing = growthShape{name: "long", changesets: 1200, files: 300, lines: 60, edits: 3, adds: 8}

// growthFigure is one row of BenchmarkGrowth's table.
type growthFigure struct {
	step                             string
	changesets                       int
	direct, agent, bundles, pull     int64 // origin bytes
	directTime, agentTime, bundlesTm time.Duration
	redirects                        int
	objects                          int
	stored                           uint64
	// transient is the bytes of stored transient objects (batches that are not full); live the
	// bytes of the stored objects the row's clone through the agent asked for: what a clone of
	// the repository as it is now uses. The rest is superseded.
	transient, live uint64
}

// clonebundles serves repo with Mercurial's own clone bundles: an `hg serve` (protocol v1, the
// clonebundles extension) behind a byte-counting tap, its manifest naming a bundle on a static
// file server.
type clonebundles struct {
	r      *rig
	tap    *tap
	dir    string // where bundles are written and served from
	static string
	n      int
}

func newClonebundles(r *rig) *clonebundles {
	ctx := context.Background()
	logs := filepath.Join(r.work, "cb-logs")
	r.must(os.MkdirAll(logs, 0o755))
	srv, err := hgserve.Serve(ctx, r.hg, r.repo.Dir, hgserve.Options{Config: []string{"extensions.clonebundles="}, Dir: logs})
	r.must(err)
	r.t.Cleanup(srv.Close)
	cb := &clonebundles{r: r, tap: newTap(r.t, srv.URL), dir: filepath.Join(r.work, "bundles")}
	r.must(os.MkdirAll(cb.dir, 0o755))
	static := httptest.NewServer(http.FileServer(http.Dir(cb.dir)))
	r.t.Cleanup(static.Close)
	cb.static = static.URL + "/"
	return cb
}

// snapshot makes a bundle of the whole repository now and advertises it (gzip: the pure-Python
// 5.6.1 has no zstd).
func (cb *clonebundles) snapshot() {
	cb.n++
	name := fmt.Sprintf("full-%d.hg", cb.n)
	cb.r.hgOrigin("bundle", "--all", "--type", "gzip-v2", filepath.Join(cb.dir, name))
	cb.r.must(os.WriteFile(filepath.Join(cb.r.repo.Dir, ".hg", "clonebundles.manifest"),
		[]byte(cb.static+name+" BUNDLESPEC=gzip-v2\n"), 0o644))
}

// clone clones with a protocol v1 client, which applies the advertised bundle and pulls the rest
// from the origin; it returns the origin's bytes and the time.
func (cb *clonebundles) clone() (int64, time.Duration) {
	r := cb.r
	dir := filepath.Join(r.work, "cb-clone-"+string(rune('a'+r.clones.Add(1)-1)))
	before := cb.tap.responseBytes.Load()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	out, err := runHG(ctx, r.hg, r.work, "clone", "--debug", cb.tap.URL, dir)
	took := time.Since(start)
	if err != nil {
		r.t.Fatalf("clonebundles clone: %v\n%s", err, tailLines(out, 30))
	}
	if !strings.Contains(out, "applying clone bundle") {
		r.t.Fatalf("the v1 client did not apply the clone bundle:\n%s", tailLines(out, 30))
	}
	_ = os.RemoveAll(dir)
	return cb.tap.responseBytes.Load() - before, took
}

// BenchmarkGrowth measures, on repositories that grow by 1, 10 and 100 changesets since the cache
// was warm, the origin bytes and time of a clone directly, through the agent (default batch
// sizes) and with Mercurial's own clone bundles (a bundle made when the cache was warm, served
// statically, a protocol v1 client), a pull of the new changesets, and what the store holds. It
// runs once whatever b.N and prints a table per repository (issue 17, bench/RESULTS.md).
//
//	go test -run '^$' -bench Growth -benchtime 1x -timeout 60m ./e2e
func BenchmarkGrowth(b *testing.B) {
	for _, shape := range []growthShape{smallGrowing, largerGrowing, longGrowing} {
		b.Run(shape.name, func(b *testing.B) {
			figures := runGrowthFigures(b, shape)
			fmt.Printf("\n%s: %d changesets at first (%d text files of %d lines, %d binary files of %d bytes; then %d files edited a changeset), batch size %d\n\n",
				shape.name, shape.changesets, shape.files, shape.lines, shape.big, shape.bigSize, shape.edits, hgv2.BatchSizeFor(int64(shape.changesets)))
			fmt.Println("| clone | changesets | origin bytes: direct | through the agent | (ratio to direct) | clonebundles (v1) | pull of the new changesets | time: direct | agent | clonebundles | redirects | objects stored | bytes stored | of which transient | live |")
			fmt.Println("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
			for _, f := range figures {
				fmt.Printf("| %s | %d | %d | %d | %.4f | %s | %s | %.1f s | %.1f s | %s | %d | %d | %d | %d | %d |\n", f.step, f.changesets, f.direct, f.agent,
					float64(f.agent)/float64(f.direct), orDash(f.bundles), orDash(f.pull), f.directTime.Seconds(), f.agentTime.Seconds(),
					secondsOrDash(f.bundlesTm), f.redirects, f.objects, f.stored, f.transient, f.live)
			}
		})
	}
}

func orDash(n int64) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprint(n)
}

func secondsOrDash(d time.Duration) string {
	if d == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f s", d.Seconds())
}

func runGrowthFigures(b *testing.B, shape growthShape) []growthFigure {
	r := newGrowthRig(b, shape)
	cb := newClonebundles(r)
	n := shape.changesets
	timed := func(fn func()) (int64, time.Duration) {
		start := time.Now()
		bytes := r.originBytes(fn)
		return bytes, time.Since(start)
	}
	var figs []growthFigure
	var ref, out string
	// measure counts what the index holds after the row's clone through the agent, and of it
	// what that clone asked for (by content key).
	measure := func(row *growthFigure) {
		asked := r.agentTap.TakeKeys()
		for _, o := range r.storedObjects() {
			row.objects++
			row.stored += o.Size
			if o.Transient {
				row.transient += o.Size
			}
			if asked[o.Key] {
				row.live += o.Size
			}
		}
	}
	row := growthFigure{step: "cold", changesets: n}
	row.direct, row.directTime = timed(func() { ref, _ = r.clone(r.originTap.URL) })
	row.agent, row.agentTime = timed(func() { _, out = r.clone(r.agentTap.URL) })
	r.waitFills()
	measure(&row)
	figs = append(figs, row)

	row = growthFigure{step: "warm, +0", changesets: n, direct: figs[0].direct, directTime: figs[0].directTime}
	cb.snapshot()
	row.agent, row.agentTime = timed(func() { _, out = r.clone(r.agentTap.URL) })
	row.redirects = redirectsFollowed(out)
	row.bundles, row.bundlesTm = cb.clone()
	measure(&row)
	figs = append(figs, row)

	for i, added := range growthSteps {
		r.grow(shape, added, 10+i)
		n += added
		row = growthFigure{step: fmt.Sprintf("+%d", added), changesets: n}
		row.pull = r.originBytes(func() {
			_, err := r.hgIn(ref, "pull", r.originTap.URL)
			r.must(err)
		})
		row.direct, row.directTime = timed(func() { r.clone(r.originTap.URL) })
		row.agent, row.agentTime = timed(func() { _, out = r.clone(r.agentTap.URL) })
		row.redirects = redirectsFollowed(out)
		row.bundles, row.bundlesTm = cb.clone() // the bundle made when the cache was last warm
		r.waitFills()
		measure(&row)
		cb.snapshot()
		figs = append(figs, row)
	}
	return figs
}
