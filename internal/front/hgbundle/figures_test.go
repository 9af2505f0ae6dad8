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
