package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/pki"
	"github.com/detourhq/detour/internal/testbed"
)

// runner runs detourctl against addr as the operator in files.
func runner(addr string, files pki.Files) func(args ...string) (string, error) {
	return func(args ...string) (string, error) {
		var out bytes.Buffer
		c := &cli{addr: addr, timeout: 10 * time.Second, out: &out, dial: func() (credentials.TransportCredentials, func(), error) {
			creds, err := pki.ClientCredentials(files)
			if err != nil {
				return nil, nil, err
			}
			return creds, creds.Close, nil
		}}
		if len(args) > 0 && args[0] == "--json" {
			c.json, args = true, args[1:]
		}
		err := c.run(args)
		return out.String(), err
	}
}

// The fleet and explain commands against a devstack of two regions: each agent is listed under its
// own identity, each region is redirected to its own target, and probe --explain shows why.
func TestAgentsProbeAndExplainInTwoRegions(t *testing.T) {
	s, err := devstack.Start(context.Background(), devstack.Options{DataDir: t.TempDir(), ObjectSize: 64 << 10,
		Regions: []string{"us", "eu"}, Log: testbed.Log(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Close(ctx)
	})
	run := runner(s.CP.Addr(), s.PKI.Operator)

	for _, r := range s.Regions {
		node := "--node=" + r.Name + "-demo"
		testbed.Eventually(t, 30*time.Second, "a redirect from the "+r.Name+" agent", func() bool {
			out, err := run("probe", "--agent", r.AgentURL, node)
			if err != nil {
				t.Fatal(err)
			}
			return strings.Contains(out, "redirect")
		})
		out, err := run("probe", "--agent", r.AgentURL, node, "--explain")
		for _, want := range []string{"/" + r.Bucket + "/objects/", `(region "` + r.Name + `")`, "decision: redirect to " + r.Target, "#1 " + r.Target} {
			if err != nil || !strings.Contains(out, want) {
				t.Fatalf("probe --explain from %s: %v, want %q in\n%s", r.Name, err, want, out)
			}
		}
	}

	testbed.Eventually(t, 15*time.Second, "both agents listed", func() bool {
		out, err := run("agents", "ls")
		return err == nil && strings.Contains(out, "spiffe://detour/agent/us") && strings.Contains(out, "spiffe://detour/agent/eu") &&
			strings.Contains(out, "2 agents, 0 lagging")
	})
	out, err := run("--json", "agents", "ls")
	var listed struct {
		Agents []struct {
			ID, Region      string
			AppliedRevision string `json:"appliedRevision"`
		} `json:"agents"`
	}
	if err != nil || json.Unmarshal([]byte(out), &listed) != nil || len(listed.Agents) != 2 || listed.Agents[0].Region != "eu" ||
		listed.Agents[0].AppliedRevision == "" || listed.Agents[0].AppliedRevision == "0" {
		t.Fatalf("agents ls --json: %v\n%s", err, out)
	}

	// A key nobody stored, from a region without targets: a fill across regions.
	out, err = run("explain", strings.Repeat("0", 64), "--region", "ap", "--accept", "us-gcs,eu-gcs")
	if err != nil || !strings.Contains(out, "decision: inline, and fill") || !strings.Contains(out, "fill candidates:") {
		t.Fatalf("explain of a miss: %v\n%s", err, out)
	}
	if _, err := run("explain"); !errors.As(err, new(usageError)) {
		t.Fatalf("explain without a key: %v", err)
	}
}

// A lagging agent is flagged in the table and counted in the summary.
func TestAgentsTableFlagsLaggingAgents(t *testing.T) {
	now := time.Date(2026, 12, 2, 5, 0, 0, 0, time.UTC)
	resp := &pb.ListAgentsResponse{TargetsRevision: 40, LagThreshold: durationpb.New(30 * time.Second), Agents: []*pb.Agent{
		{Id: "spiffe://detour/agent/a", Region: "us", AppliedRevision: 40, Refreshed: timestamppb.New(now.Add(-3 * time.Second)),
			StoreBytes: 19_600_000, OriginBytes: 400_000},
		{Id: "spiffe://detour/agent/b", Region: "eu", AppliedRevision: 12, Refreshed: timestamppb.New(now),
			BehindFor: durationpb.New(95 * time.Second), Lagging: true},
	}}
	var out bytes.Buffer
	(&cli{out: &out}).printAgents(resp, now)
	got := out.String()
	for _, want := range []string{"LAGGING (behind 1m35s)", "current", "never", "3s ago", "2 agents, 1 lagging", "revision 40, for over 30s",
		"98.0%", "19.6 MB/400.0 kB", "  -  ", "offload 98.0%: 19.6 MB served by targets, 400.0 kB by the origin"} {
		if !strings.Contains(got, want) {
			t.Fatalf("want %q in\n%s", want, got)
		}
	}
}
