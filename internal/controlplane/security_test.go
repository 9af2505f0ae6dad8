package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/pki"
	"github.com/detourhq/detour/internal/testbed"
)

// issue writes a certificate for identity, signed by the test PKI's CA, into a fresh directory.
func issue(t *testing.T, identity string) pki.Files {
	t.Helper()
	dev := testbed.PKI(t)
	ca, err := pki.LoadCA(dev.Dir)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), ca.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := ca.WriteLeaf(dir, "id", pki.Leaf{Name: "test", URIs: []string{identity}})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func targetCount(t *testing.T, r *replica) int {
	t.Helper()
	l, err := r.admin.ListTargets(context.Background(), &pb.ListTargetsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return len(l.Targets)
}

// Every RPC needs a certificate the policy admits for its role; refusals carry the right code,
// write nothing, and are counted.
func TestRPCsAreRefusedWithoutTheRightCertificate(t *testing.T) {
	t.Parallel()
	r := startReplica(t)
	ctx := context.Background()
	dev := testbed.PKI(t)
	createTargets(t, r, target(t, "us-a", "us"))
	waitHealth(t, r, "us-a", true)
	newTarget := func(name string) *pb.CreateTargetRequest {
		return &pb.CreateTargetRequest{Target: target(t, name, "us")}
	}
	addr := r.addr()

	// TLS but no client certificate: Unauthenticated; health checks still answer.
	anon := testbed.Dial(t, addr, dev.CA)
	if _, err := pb.NewAdminServiceClient(anon).CreateTarget(ctx, newTarget("anon")); code(err) != codes.Unauthenticated {
		t.Fatalf("no certificate: %v, want Unauthenticated", err)
	}
	if _, err := pb.NewPlacementServiceClient(anon).Place(ctx, &pb.PlaceRequest{Key: key(1), Command: "filesdata",
		AcceptedTargets: []string{"us-a"}, AgentRegion: "us"}); code(err) != codes.Unauthenticated {
		t.Fatalf("no certificate, Place: %v, want Unauthenticated", err)
	}
	if resp, err := healthpb.NewHealthClient(anon).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health without a certificate: %v %v", resp, err)
	}

	// Plaintext to a TLS server: the connection fails.
	plain, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if _, err := pb.NewAdminServiceClient(plain).CreateTarget(ctx, newTarget("plain")); code(err) != codes.Unavailable {
		t.Fatalf("plaintext: %v, want Unavailable", err)
	}

	// A certificate from another CA: the handshake fails.
	other, err := pki.NewCA("another CA")
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := other.Issue(pki.Leaf{Name: "intruder", URIs: []string{pki.OperatorPrefix + "intruder"}})
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	caPEM, _ := os.ReadFile(dev.CA.CA)
	roots.AppendCertsFromPEM(caPEM)
	// GetClientCertificate presents it even though the server asks for its own CA's certificates.
	foreign, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &pair, nil }})))
	if err != nil {
		t.Fatal(err)
	}
	defer foreign.Close()
	if _, err := pb.NewAdminServiceClient(foreign).CreateTarget(ctx, newTarget("foreign")); code(err) != codes.Unavailable {
		t.Fatalf("another CA's certificate: %v, want Unavailable (handshake refused)", err)
	}

	// Roles: an agent may not administer, an operator may not report fills, a reader may only
	// read, only mirrors heartbeat.
	agentAdmin := pb.NewAdminServiceClient(testbed.Dial(t, addr, dev.Agent))
	if _, err := agentAdmin.CreateTarget(ctx, newTarget("by-agent")); code(err) != codes.PermissionDenied {
		t.Fatalf("agent certificate calling Admin: %v, want PermissionDenied", err)
	}
	if _, err := agentAdmin.DeleteTarget(ctx, &pb.DeleteTargetRequest{Name: "us-a"}); code(err) != codes.PermissionDenied {
		t.Fatalf("agent certificate deleting a target: %v", err)
	}
	g := grant(t, r, key(2), []string{"us-a"}, "us")
	opPlace := pb.NewPlacementServiceClient(r.op)
	if _, err := opPlace.ReportFill(ctx, &pb.ReportFillRequest{Key: key(2), Target: g.Target, Token: g.Token, Size: 1,
		MediaType: g.MediaType, Sha256: make([]byte, 32), Sha1: make([]byte, 20), Generation: 1}); code(err) != codes.PermissionDenied {
		t.Fatalf("operator certificate calling ReportFill: %v, want PermissionDenied", err)
	}
	reader := pb.NewAdminServiceClient(testbed.Dial(t, addr, dev.Reader))
	if _, err := reader.GetTarget(ctx, &pb.GetTargetRequest{Name: "us-a"}); err != nil {
		t.Fatalf("reader reading: %v", err)
	}
	if _, err := reader.ListObjects(ctx, &pb.ListObjectsRequest{}); err != nil {
		t.Fatalf("reader listing: %v", err)
	}
	if _, err := reader.SetTargetState(ctx, &pb.SetTargetStateRequest{Name: "us-a", State: pb.TargetState_TARGET_STATE_DISABLED}); code(err) != codes.PermissionDenied {
		t.Fatalf("reader writing: %v, want PermissionDenied", err)
	}
	if _, err := r.place.Heartbeat(ctx, &pb.HeartbeatRequest{Target: "us-a"}); code(err) != codes.PermissionDenied {
		t.Fatalf("agent heartbeating a target: %v, want PermissionDenied", err)
	}

	// A report or abort for a claim another agent holds: refused, and the holder's stands.
	other2 := pb.NewPlacementServiceClient(testbed.Dial(t, addr, issue(t, pki.AgentPrefix+"other")))
	res := upload(t, g, key(2), []byte(strings.Repeat("the holder's bytes ", 100)))
	if _, err := other2.ReportFill(ctx, report(key(2), g, res)); code(err) != codes.PermissionDenied {
		t.Fatalf("another agent reporting the claim: %v, want PermissionDenied", err)
	}
	if _, err := other2.AbortFill(ctx, &pb.AbortFillRequest{Key: key(2), Token: g.Token}); code(err) != codes.PermissionDenied {
		t.Fatalf("another agent aborting the claim: %v, want PermissionDenied", err)
	}
	if _, err := r.place.ReportFill(ctx, report(key(2), g, res)); err != nil {
		t.Fatalf("the holder's report after the refused ones: %v", err)
	}

	if n := targetCount(t, r); n != 1 {
		t.Fatalf("%d targets after refused writes, want 1", n)
	}
	got, _ := r.admin.GetTarget(ctx, &pb.GetTargetRequest{Name: "us-a"})
	if got.GetTarget().GetState() != pb.TargetState_TARGET_STATE_ACTIVE {
		t.Fatalf("a refused write changed the target: %v", got)
	}
	metrics := httpGet(t, "http://"+r.metricsAddr()+"/metrics")
	for _, want := range []string{`reason="no_client_certificate"`, `reason="policy"`, `reason="not_claim_holder"`, `reason="tls_handshake"`} {
		if !strings.Contains(metrics, "detour_auth_rejections_total{"+want+"}") {
			t.Errorf("rejections not counted: %s", want)
		}
	}
}

// Certificates and the policy change on disk and take effect without a restart.
func TestCertificatesAndPolicyReloadWithoutRestart(t *testing.T) {
	t.Parallel()
	dev := testbed.PKI(t)
	ca, err := pki.LoadCA(dev.Dir)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), ca.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	serverLeaf := pki.Leaf{Name: "controlplane", Hosts: []string{"127.0.0.1"}, Server: true}
	files, err := ca.WriteLeaf(dir, "server", serverLeaf)
	if err != nil {
		t.Fatal(err)
	}
	files.Refresh = 100 * time.Millisecond
	policy := filepath.Join(dir, "policy.json")
	// At first readers may not even read.
	strict := strings.Replace(DefaultAuthzPolicy, `"spiffe://detour/reader/*"`, `"spiffe://detour/nobody/*"`, 1)
	if err := os.WriteFile(policy, []byte(strict), 0o644); err != nil {
		t.Fatal(err)
	}
	r := startReplicaWith(t, Options{TLS: files,
		AuthzPolicyFile: policy, AuthzRefresh: 100 * time.Millisecond})
	ctx := context.Background()

	serial := func() string {
		conn, err := tls.Dial("tcp", r.addr(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].SerialNumber.String()
	}
	before := serial()
	if _, err := ca.WriteLeaf(dir, "server", serverLeaf); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the rotated server certificate served", func() bool { return serial() != before })
	// Clients still verify it, and existing operators keep working.
	if _, err := r.admin.ListTargets(ctx, &pb.ListTargetsRequest{}); err != nil {
		t.Fatalf("after rotation: %v", err)
	}

	// A client certificate rotates too: the agent's next connection presents the new one.
	agentDir := t.TempDir()
	_ = os.WriteFile(filepath.Join(agentDir, "ca.pem"), ca.CertPEM, 0o644)
	af, err := ca.WriteLeaf(agentDir, "agent", pki.Leaf{Name: "agent", URIs: []string{pki.OperatorPrefix + "not-yet-agent"}})
	if err != nil {
		t.Fatal(err)
	}
	af.Refresh = 100 * time.Millisecond
	creds, err := pki.ClientCredentials(af)
	if err != nil {
		t.Fatal(err)
	}
	defer creds.Close()
	dial := func() pb.PlacementServiceClient {
		conn, err := grpc.NewClient(r.addr(), grpc.WithTransportCredentials(creds))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return pb.NewPlacementServiceClient(conn)
	}
	place := &pb.PlaceRequest{Key: key(1), Command: "filesdata", AcceptedTargets: []string{"x"}, AgentRegion: "us"}
	if _, err := dial().Place(ctx, place); code(err) != codes.PermissionDenied {
		t.Fatalf("an operator identity calling Place: %v", err)
	}
	if _, err := ca.WriteLeaf(agentDir, "agent", pki.Leaf{Name: "agent", URIs: []string{pki.AgentPrefix + "rotated"}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the rotated agent certificate accepted", func() bool {
		_, err := dial().Place(ctx, place)
		return err == nil
	})

	reader := pb.NewAdminServiceClient(testbed.Dial(t, r.addr(), dev.Reader))
	if _, err := reader.ListTargets(ctx, &pb.ListTargetsRequest{}); code(err) != codes.PermissionDenied {
		t.Fatalf("reader under the strict policy: %v", err)
	}
	if err := os.WriteFile(policy, []byte(DefaultAuthzPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the reloaded policy admits readers", func() bool {
		_, err := reader.ListTargets(ctx, &pb.ListTargetsRequest{})
		return err == nil
	})
}

// Admin can be served on its own address: Placement's port then refuses it (Unimplemented), and
// the admin port serves no Placement.
func TestAdminOnItsOwnListener(t *testing.T) {
	t.Parallel()
	adminAddr := testbed.FreeAddr(t)
	r := startReplicaWith(t, Options{AdminListen: adminAddr})
	ctx := context.Background()
	dev := testbed.PKI(t)
	if _, err := r.admin.ListTargets(ctx, &pb.ListTargetsRequest{}); err != nil {
		t.Fatalf("admin on %s: %v", adminAddr, err)
	}
	onPlacementPort := pb.NewAdminServiceClient(testbed.Dial(t, r.addr(), dev.Operator))
	if _, err := onPlacementPort.ListTargets(ctx, &pb.ListTargetsRequest{}); code(err) != codes.Unimplemented {
		t.Fatalf("admin on the placement port: %v, want Unimplemented", err)
	}
	onAdminPort := pb.NewPlacementServiceClient(testbed.Dial(t, adminAddr, dev.Agent))
	if _, err := onAdminPort.Place(ctx, &pb.PlaceRequest{Key: key(1), Command: "filesdata", AgentRegion: "us"}); code(err) != codes.Unimplemented {
		t.Fatalf("placement on the admin port: %v, want Unimplemented", err)
	}
	if _, _, err := net.SplitHostPort(r.adminAddr()); err != nil || r.adminAddr() == r.addr() {
		t.Fatalf("AdminAddr %q", r.adminAddr())
	}
}

// One agent cannot flood etcd with claims: past its rate, misses are answered inline without one.
func TestClaimRateIsBoundedPerAgent(t *testing.T) {
	t.Parallel()
	r := startReplicaWith(t, Options{ClaimRate: 1, ClaimBurst: 3})
	createTargets(t, r, target(t, "us-a", "us"))
	waitHealth(t, r, "us-a", true)
	setPolicy(t, r, func(p *pb.Policy) { p.MinOccurrences = 1 }) // this test is about the first miss
	granted, limited := 0, 0
	for i := range 10 {
		resp, err := r.place.Place(context.Background(), &pb.PlaceRequest{Key: key(300 + i), Command: "filesdata",
			AcceptedTargets: []string{"us-a"}, AgentRegion: "us", AgentId: "a1"})
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case resp.Fill != nil:
			granted++
		case resp.Reason == "claim_rate_limited":
			limited++
		}
	}
	if granted > 4 || limited < 6 {
		t.Fatalf("10 quick misses from one agent: %d claims, %d limited (rate 1/s, burst 3)", granted, limited)
	}
	// Another agent has its own bucket.
	other := pb.NewPlacementServiceClient(testbed.Dial(t, r.addr(), issue(t, pki.AgentPrefix+"second")))
	resp, err := other.Place(context.Background(), &pb.PlaceRequest{Key: key(400), Command: "filesdata",
		AcceptedTargets: []string{"us-a"}, AgentRegion: "us", AgentId: "a2"})
	if err != nil || resp.Fill == nil {
		t.Fatalf("another agent limited by the first one's rate: %v %v", resp, err)
	}
}

// The policy the Kubernetes manifests mount is the built-in default, so the two never drift.
func TestDeployedPolicyIsTheDefault(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "k8s", "base", "authz-policy.json"))
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != DefaultAuthzPolicy {
		t.Fatal("deploy/k8s/base/authz-policy.json differs from internal/controlplane/authz-policy.json")
	}
}
