package hgbundle_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestFiguresOriginBytes measures the baseline row of issue 18's figures: the bytes `hg serve`
// (6.3.2) sends for a direct clone, and for a clone that applies Mercurial's own clone bundle
// (`hg bundle --all --type zstd-v2`, advertised by the clonebundles extension from
// .hg/clonebundles.manifest, served statically) made before 1, 10 and 100 new changesets.
// Bytes are response bodies counted by a proxy in front of `hg serve`. It runs only with
// DETOUR_HGBUNDLE_FIGURES=1:
//
//	DETOUR_HGBUNDLE_FIGURES=1 go test -count=1 -run TestFiguresOriginBytes -v ./internal/front/hgbundle/
func TestFiguresOriginBytes(t *testing.T) {
	if os.Getenv("DETOUR_HGBUNDLE_FIGURES") != "1" {
		t.Skip("set DETOUR_HGBUNDLE_FIGURES=1 to measure")
	}
	type row struct {
		name   string
		bytes  int64
		took   time.Duration
		bundle int64
	}
	var rows []row
	for _, n := range []int{1, 10, 100} {
		o := newOrigin(t, "extensions.clonebundles=")
		fs := newFiles(t)
		p := newProxy(t, o.server.URL) // no manifest of its own: a pass-through that counts
		own := filepath.Join(fs.dir, "own.zstd.hg")
		if _, err := o.repo.Hg(ctxFor(t, time.Minute), "bundle", "--quiet", "--all", "--type", "zstd-v2", own); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(own)
		if err != nil {
			t.Fatal(err)
		}
		manifest := fs.URL + "/own.zstd.hg BUNDLESPEC=zstd-v2\n"
		if err := os.WriteFile(filepath.Join(o.repo.Dir, ".hg", "clonebundles.manifest"), []byte(manifest), 0o644); err != nil {
			t.Fatal(err)
		}
		o.commit(t, n, fmt.Sprintf("n%d", n))

		clone := func(name string, config ...string) {
			p.originBytes.Store(0)
			dir := filepath.Join(t.TempDir(), "clone")
			args := append(config, "clone", "--noupdate", p.URL, dir)
			start := time.Now()
			out, err := hgOut(t, o.hg, t.TempDir(), args...)
			took := time.Since(start)
			if err != nil {
				t.Fatalf("%s: %v\n%s", name, err, out)
			}
			usedBundle := strings.Contains(out, "applying clone bundle")
			if usedBundle == (len(config) > 0) {
				t.Fatalf("%s: applied a bundle: %v\n%s", name, usedBundle, out)
			}
			rows = append(rows, row{name, p.originBytes.Load(), took, fi.Size()})
		}
		if n == 1 {
			clone("direct clone", "--config", "ui.clonebundles=false")
		}
		clone(fmt.Sprintf("own clone bundle, %d new changesets", n))
	}
	direct := rows[0].bytes
	t.Logf("%-40s %12s %8s %10s", "clone", "origin bytes", "ratio", "time")
	for _, r := range rows {
		t.Logf("%-40s %12d %7.2f%% %10s", r.name, r.bytes, 100*float64(r.bytes)/float64(direct), r.took.Round(time.Millisecond))
	}
	t.Logf("bundle file (zstd-v2, made before the new changesets): %d bytes", rows[1].bundle)
}

// TestFiguresDetourOriginBytes measures Detour's rows of the same figures: the origin's bytes
// for clones through the agent with stock 6.3.2 (a direct clone, the cold clone that makes the
// bundles, a warm one, and clones right after 1, 10 and 100 new changesets, before any new
// bundle is made), and what the agent's one fetch of a checkpoint's bundle cost the origin. It
// runs only with DETOUR_HGBUNDLE_FIGURES=1:
//
//	DETOUR_HGBUNDLE_FIGURES=1 go test -count=1 -run TestFiguresDetourOriginBytes -v ./internal/front/hgbundle/
func TestFiguresDetourOriginBytes(t *testing.T) {
	if os.Getenv("DETOUR_HGBUNDLE_FIGURES") != "1" {
		t.Skip("set DETOUR_HGBUNDLE_FIGURES=1 to measure")
	}
	type row struct {
		name  string
		bytes int64
	}
	s := startBundleStack(t)
	hg := s.origin.hg
	s.proxy.originBytes.Store(0)
	directClone(t, hg, s.proxy.URL)
	rows := []row{{"direct clone", s.proxy.originBytes.Load()}}
	clone := func(name string) {
		_, b := s.clone(t, hg, filepath.Join(t.TempDir(), "clone"))
		rows = append(rows, row{name, b})
	}
	clone("through Detour, cold (makes the bundles)")
	s.waitStored(t, 1)
	rows = append(rows, row{"the agent's fetch of the bundle (once, fleet-wide)", s.proxy.fillBytes.Load()})
	clone("through Detour, warm")
	total := 0
	for _, n := range []int{1, 10, 100} {
		s.origin.commit(t, n, fmt.Sprintf("n%d", n))
		total += n
		clone(fmt.Sprintf("through Detour, right after %d new changesets (%d in all)", n, total))
	}
	direct := rows[0].bytes
	t.Logf("%-66s %12s %8s", "clone", "origin bytes", "ratio")
	for _, r := range rows {
		t.Logf("%-66s %12d %7.2f%%", r.name, r.bytes, 100*float64(r.bytes)/float64(direct))
	}
}
