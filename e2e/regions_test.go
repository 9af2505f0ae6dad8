package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/front/hgv2"
	"github.com/detourhq/detour/internal/testbed"
	"github.com/detourhq/detour/internal/wire"
)

// detourctl runs the operator's CLI against the rig's control plane.
func (r *rig) detourctl(args ...string) string {
	r.t.Helper()
	bin := filepath.Join(testbed.Binaries(r.t), "detourctl")
	op := testbed.PKI(r.t).Operator
	out, err := exec.Command(bin, append([]string{"--controlplane", r.cp.Addr, "--tls-ca", op.CA, "--tls-cert", op.Cert,
		"--tls-key", op.Key}, args...)...).CombinedOutput()
	if err != nil {
		r.t.Fatalf("detourctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

var redirectTo = regexp.MustCompile(`\(following redirect to (\S+)\)`)

// redirectBuckets lists the buckets of the locations hg --debug says it followed (a public URL is
// http://host/<bucket>/<object>).
func redirectBuckets(out string) []string {
	var buckets []string
	for _, m := range redirectTo.FindAllStringSubmatch(out, -1) {
		rest := m[1][strings.Index(m[1], "://")+3:]
		parts := strings.SplitN(rest, "/", 3)
		if len(parts) == 3 {
			buckets = append(buckets, parts[1])
		}
	}
	return buckets
}

// originKeys returns the content key of every cacheable command the agents sent to the origin, in
// order (one entry per request).
func (r *rig) originKeys() []string {
	r.t.Helper()
	var keys []string
	for _, name := range []string{"manifestdata", "filesdata"} {
		for _, body := range r.originTap.Requests(name) {
			rs, err := wire.ReadRequest(bytes.NewReader(body), wire.ReaderOptions{})
			r.must(err)
			k, err := hgv2.ContentKey(repoID, rs.Commands[0])
			r.must(err)
			keys = append(keys, k)
		}
	}
	return keys
}

// Two regions, one control plane, one agent per region, each region's own bucket, and the real
// Mercurial: clones from each region's agent while eu's target drains (serving what only it has,
// then handing it over), is disabled (a region without a store fills through another), and gets
// its store back (hot keys are copied in by the store). Every clone succeeds and is identical to a
// clone from the origin, and the origin computes each content key once: only when no copy exists
// anywhere.
func TestRealMercurialAcrossRegions(t *testing.T) {
	const usBucket, euBucket = "detour-us", "detour-eu"
	// A smaller repository than fullRepo: this test is about where bytes come from, not about
	// responses large enough to race the client's threads.
	r := newBareRig(t, repoShape{files: 60, bigFiles: 2, bigSize: 1 << 20},
		"--region", "us", "--probe-interval", "1s", "--copy-interval", "200ms", "--copy-rate", "50")
	// Placement decisions are what this test checks, so a loaded machine must not turn them into
	// fail-open inline answers (the agent's 50ms default bounds a fill claim's etcd write).
	r.agentFlags = []string{"--place-timeout", "2s"}
	r.addTarget("us-gcs", usBucket, "us")
	r.addTarget("eu-gcs", euBucket, "eu")
	// Copies made by the store wait for the last part; drains first stay within their region.
	r.detourctl("policy", "set", "--cross-region-copies=false", "--forbid-cross-region-fills")
	us, usTap := r.startAgent("us", "us-gcs", "eu-gcs")
	eu, euTap := r.startAgent("eu", "us-gcs", "eu-gcs")
	r.waitAdvertised(eu, func(names []string) bool { return strings.Join(names, ",") == "eu-gcs,us-gcs" })
	r.waitAdvertised(us, func(names []string) bool { return strings.Join(names, ",") == "us-gcs,eu-gcs" })

	refDir, _ := r.clone(r.origin.URL)
	ref := r.state(refDir)
	content := func() int { c := r.originCounts(); return c["manifestdata"] + c["filesdata"] }
	// cloneVia clones through an agent's tap and checks the clone against the origin's, and that
	// it followed at least minRedirects redirects, all into bucket (when given).
	cloneVia := func(what string, tp *tap, minRedirects int, bucket string) string {
		t.Helper()
		dir, out := r.clone(tp.URL)
		r.verify(dir)
		assertSame(t, what, ref, r.state(dir))
		buckets := redirectBuckets(out)
		if len(buckets) < minRedirects {
			t.Fatalf("%s followed %d redirects, want at least %d (%v)", what, len(buckets), minRedirects, commandsSent(out))
		}
		for _, b := range buckets {
			if bucket != "" && b != bucket {
				t.Fatalf("%s was redirected into %s, want %s only (%v)", what, b, bucket, buckets)
			}
		}
		return out
	}
	// warm checks that a clone through tp costs the origin no content.
	warm := func(what string, tp *tap, bucket string) {
		t.Helper()
		before := content()
		cloneVia(what, tp, 2, bucket)
		if after := content(); after != before {
			t.Fatalf("%s: the origin computed %d content responses although every key had a copy", what, after-before)
		}
	}

	// eu's first clone fills eu's own store.
	cloneVia("cold clone in eu", euTap, 0, "")
	r.waitFillsOf(eu)
	stored, err := r.admin.ListObjects(context.Background(), &pb.ListObjectsRequest{Target: "eu-gcs"})
	r.must(err)
	if n := len(stored.Objects); n < 2 {
		t.Fatalf("eu-gcs holds %d objects after a cold clone, want manifestdata and filesdata", n)
	}
	sole := fmt.Sprintf("%d sole of %d copies", len(stored.Objects), len(stored.Objects))

	t.Run("draining target serves what only it has, to both regions", func(t *testing.T) {
		r.detourctl("targets", "drain", "eu-gcs")
		if out := r.detourctl("targets", "get", "eu-gcs"); !strings.Contains(out, "DRAINING") || !strings.Contains(out, sole) {
			t.Fatalf("drain progress: want %q in\n%s", sole, out)
		}
		r.waitAdvertised(eu, func(names []string) bool { return strings.Join(names, ",") == "us-gcs,eu-gcs" })
		warm("eu clone while eu-gcs drains", euTap, euBucket)
		warm("us clone while eu-gcs drains", usTap, euBucket)
	})

	t.Run("the janitor copies the sole copies away, then the draining copies are not used", func(t *testing.T) {
		r.detourctl("policy", "set", "--forbid-cross-region-fills=false")
		testbed.Eventually(t, 30*time.Second, "the drain completes", func() bool {
			return strings.Contains(r.detourctl("targets", "get", "eu-gcs"), "complete (0 sole of")
		})
		warm("eu clone after the drain", euTap, usBucket)
		warm("us clone after the drain", usTap, usBucket)
	})

	t.Run("disabled target is withdrawn and gets nothing", func(t *testing.T) {
		r.detourctl("targets", "disable", "eu-gcs")
		for _, a := range []*testbed.Agent{eu, us} {
			r.waitAdvertised(a, func(names []string) bool { return strings.Join(names, ",") == "us-gcs" })
		}
		warm("eu clone with eu-gcs disabled", euTap, usBucket)
		warm("us clone with eu-gcs disabled", usTap, usBucket)
	})

	t.Run("a region without a store fills through another", func(t *testing.T) {
		r.must(r.repo.Populate(7, 40, 1, 1200<<10))
		r.commit("new work")
		refDir, _ := r.clone(r.origin.URL)
		ref = r.state(refDir)
		fills := r.cpMetric("detour_cross_region_fills_total", `target_region="us"`)
		cloneVia("eu clone of new content", euTap, 0, usBucket)
		r.waitFillsOf(eu)
		if got := r.cpMetric("detour_cross_region_fills_total", `target_region="us"`); got < fills+2 {
			t.Fatalf("cross-region fills went from %v to %v, want manifestdata and filesdata more", fills, got)
		}
		warm("us clone of content eu filled", usTap, usBucket)
	})

	t.Run("hot cross-region keys are copied into the region by the store", func(t *testing.T) {
		r.detourctl("targets", "activate", "eu-gcs")
		r.detourctl("policy", "set", "--cross-region-copies", "--cross-region-copy-threshold", "1")
		r.waitAdvertised(eu, func(names []string) bool { return strings.Join(names, ",") == "eu-gcs,us-gcs" })
		// The new content is only in us: two eu clones take its keys past the threshold.
		before := r.cpMetric("detour_store_copies_total", `reason="cross_region"`, `outcome="ready"`)
		warm("eu clone 1 of content only us has", euTap, "")
		warm("eu clone 2 of content only us has", euTap, "")
		testbed.Eventually(t, 30*time.Second, "the store's copies into eu", func() bool {
			return r.cpMetric("detour_store_copies_total", `reason="cross_region"`, `outcome="ready"`) >= before+2
		})
		warm("eu clone after the copies", euTap, euBucket)
		warm("us clone after the copies", usTap, usBucket)
	})

	// Every content key the origin computed, it computed once: for the first clone that asked
	// for it, when no copy existed anywhere.
	keys := r.originKeys()
	for i, k := range keys {
		if slices.Contains(keys[:i], k) {
			t.Fatalf("the origin computed key %s twice (%d content requests from the agents)", k[:12], len(keys))
		}
	}
	if len(keys) < 4 {
		t.Fatalf("%d content requests from the agents; the two cold clones alone make 4", len(keys))
	}
}

func (r *rig) cpMetric(name string, labels ...string) float64 {
	return testbed.Metric(r.t, "http://"+r.cp.MetricsAddr+"/metrics", name, labels...)
}
