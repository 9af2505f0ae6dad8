package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/controlplane"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/pki"
	"github.com/detourhq/detour/internal/testbed"
)

// The CLI against a real control plane on an embedded etcd.
func TestTargetsAndPolicyCommands(t *testing.T) {
	dev := testbed.PKI(t)
	inst, err := devstack.StartControlPlane(context.Background(), controlplane.Options{Listen: "127.0.0.1:0", DataDir: t.TempDir(),
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)), TLS: pki.Files{Cert: dev.ControlPlane.Cert, Key: dev.ControlPlane.Key, CA: dev.CA.CA}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		inst.Shutdown(ctx)
	})
	run := runner(inst.Addr(), dev.Operator)
	out, err := run("targets", "add", "us-cdn", "--region", "us-east1", "--uri", "https://cdn.example.com/",
		"--tls", "1.2,1.3", "--bucket", "detour-us", "--prefix", "hg/", "--cdn-base-url", "https://cdn.example.com/")
	if err != nil || !strings.Contains(out, "us-cdn") || !strings.Contains(out, "gs://detour-us/hg/") {
		t.Fatalf("add: %v\n%s", err, out)
	}
	// The server's validation error comes through as it is.
	_, err = run("targets", "add", "bad", "--region", "us", "--uri", "ftp://x/", "--bucket", "detour-us", "--public-base-url", "https://x/")
	if s, _ := status.FromError(err); s.Code() != codes.InvalidArgument || !strings.Contains(s.Message(), "target.uris[0]") {
		t.Fatalf("invalid add: %v", err)
	}
	if _, err := run("targets", "add", "x", "--public-base-url", "https://a/", "--cdn-base-url", "https://b/"); !errors.As(err, new(usageError)) {
		t.Fatalf("two url forms: %v", err)
	}
	// update changes only the flags given.
	if _, err := run("targets", "update", "us-cdn", "--weight", "7"); err != nil {
		t.Fatal(err)
	}
	out, err = run("--json", "targets", "get", "us-cdn")
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Weight      int      `json:"weight"`
		TLSVersions []string `json:"tlsVersions"`
		State       string   `json:"state"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil || got.Weight != 7 || strings.Join(got.TLSVersions, ",") != "1.2,1.3" {
		t.Fatalf("after update: %v\n%s", err, out)
	}
	if out, err = run("targets", "drain", "us-cdn"); err != nil || !strings.Contains(out, "DRAINING") {
		t.Fatalf("drain: %v\n%s", err, out)
	}
	// A draining target shows its drain's progress (nothing stored here, so it is complete).
	if out, err = run("targets", "get", "us-cdn"); err != nil || !strings.Contains(out, "complete (0 sole of 0 copies)") {
		t.Fatalf("get of a draining target: %v\n%s", err, out)
	}
	out, err = run("policy", "set", "--forbid-cross-region-fills", "--cross-region-copy-threshold", "3",
		"--cross-region-copy-window", "30s", "--cross-region-copies=false")
	for _, want := range []string{"forbid_cross_region_fills    true", "cross_region_copies          false",
		"cross_region_copy_threshold  3", "cross_region_copy_window     30s"} {
		if err != nil || !strings.Contains(out, want) {
			t.Fatalf("policy set of the region switches: %v, want %q in\n%s", err, want, out)
		}
	}
	_, err = run("policy", "set", "--cross-region-copy-threshold", "2000000")
	if s, _ := status.FromError(err); s.Code() != codes.InvalidArgument || !strings.Contains(s.Message(), "policy.cross_region_copy_threshold") {
		t.Fatalf("threshold out of bounds: %v", err)
	}
	out, err = run("policy", "set", "--min-occurrences", "1", "--admission-window", "1m")
	for _, want := range []string{"min_occurrences              1", "admission_window             1m0s"} {
		if err != nil || !strings.Contains(out, want) {
			t.Fatalf("policy set of admission: %v, want %q in\n%s", err, want, out)
		}
	}
	_, err = run("policy", "set", "--min-occurrences", "256")
	if s, _ := status.FromError(err); s.Code() != codes.InvalidArgument || !strings.Contains(s.Message(), "policy.min_occurrences") {
		t.Fatalf("min occurrences out of bounds: %v", err)
	}
	out, err = run("policy", "set", "--transient-object-ttl", "6h")
	if err != nil || !strings.Contains(out, "transient_object_ttl         6h0m0s") || !strings.Contains(out, "object_ttl                   (default)") {
		t.Fatalf("policy set of the transient object TTL: %v\n%s", err, out)
	}
	_, err = run("policy", "set", "--transient-object-ttl", "-1h")
	if s, _ := status.FromError(err); s.Code() != codes.InvalidArgument || !strings.Contains(s.Message(), "policy.transient_object_ttl") {
		t.Fatalf("negative transient object TTL: %v", err)
	}
	_, err = run("policy", "set", "--object-ttl", "1h")
	if s, _ := status.FromError(err); s.Code() != codes.InvalidArgument || !strings.Contains(s.Message(), "policy.transient_object_ttl") {
		t.Fatalf("an object TTL below the transient one: %v", err)
	}
	out, err = run("policy", "set", "--min-redirect-bytes", "65536", "--region-preference", "us-east1,europe-west1")
	if err != nil || !strings.Contains(out, "65536") || !strings.Contains(out, "us-east1,europe-west1") {
		t.Fatalf("policy set: %v\n%s", err, out)
	}
	if out, err = run("objects", "ls"); err != nil || !strings.HasPrefix(out, "KEY") {
		t.Fatalf("objects ls: %v\n%s", err, out)
	}
	if _, err = run("targets", "rm", "us-cdn"); err != nil {
		t.Fatal(err)
	}
	_, err = run("targets", "get", "us-cdn")
	if s, _ := status.FromError(err); s.Code() != codes.NotFound {
		t.Fatalf("get after rm: %v", err)
	}
}

// A target's warnings follow the table, one line each, naming the target; JSON carries them as a
// field.
func TestTargetWarningsAreShown(t *testing.T) {
	ts := []*pb.Target{{Name: "ok"}, {Name: "pub", Warnings: []string{"private content at public URLs"}}}
	var out bytes.Buffer
	if err := (&cli{out: &out}).showTargets(ts...); err != nil {
		t.Fatal(err)
	}
	if got := out.String(); !strings.Contains(got, "\nwarning: target pub: private content at public URLs\n") || strings.Contains(got, "target ok:") {
		t.Fatalf("table output:\n%s", got)
	}
	out.Reset()
	if err := (&cli{out: &out, json: true}).showTargets(ts[1]); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), `"warnings"`) {
		t.Fatalf("JSON output lacks the warnings: %s", out.String())
	}
}
