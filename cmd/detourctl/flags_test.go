package main

import (
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

	"github.com/detourhq/detour/internal/controlplane"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/pki"
	"github.com/detourhq/detour/internal/testbed"
)

// Integers that do not fit their field are refused by name before anything is sent (--weight
// 99999999999 was sent as 1215752191 and accepted), and values the API refuses come back naming
// the field: a min_redirect_bytes that turns redirects off, credentials in a base URL.
func TestFlagValuesThatDoNotFitAreRefused(t *testing.T) {
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
	add := []string{"targets", "add", "t1", "--region", "us", "--uri", "https://cdn.example.com/", "--bucket", "detour-us",
		"--cdn-base-url", "https://cdn.example.com/"}
	if _, err := run(add...); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"targets", "update", "t1", "--weight", "99999999999"},
		{"targets", "add", "t2", "--weight", "4294967296"},
		{"policy", "set", "--min-occurrences", "4294967297"},
		{"policy", "set", "--cross-region-copy-threshold", "99999999999"},
		{"objects", "ls", "--limit", "4294967297"},
	} {
		flag := strings.TrimPrefix(args[len(args)-2], "--")
		_, err := run(args...)
		if !errors.As(err, new(usageError)) || !strings.Contains(err.Error(), "-"+flag) {
			t.Errorf("%v: %v, want a usage error naming -%s", args, err, flag)
		}
	}
	out, err := run("--json", "targets", "get", "t1")
	var got struct {
		Weight int `json:"weight"`
	}
	if err != nil || json.Unmarshal([]byte(out), &got) != nil || got.Weight != 1 {
		t.Fatalf("the target after refused updates: %v\n%s", err, out)
	}
	for _, c := range []struct {
		args  []string
		field string
	}{
		{[]string{"policy", "set", "--min-redirect-bytes", "18446744073709551615"}, "policy.min_redirect_bytes"},
		{[]string{"targets", "update", "t1", "--public-base-url", "https://user:pw@storage.example.com/b/"}, "target.url_form.public_base_url"},
		{[]string{"targets", "update", "t1", "--cdn-base-url", "https://cdn.example.com/?token=1"}, "target.url_form.cdn_base_url"},
		{[]string{"targets", "update", "t1", "--weight", "10001"}, "target.weight"},
	} {
		_, err := run(c.args...)
		if s, _ := status.FromError(err); s.Code() != codes.InvalidArgument || !strings.Contains(s.Message(), c.field) {
			t.Errorf("%v: %v, want InvalidArgument naming %s", c.args, err, c.field)
		}
	}
}
