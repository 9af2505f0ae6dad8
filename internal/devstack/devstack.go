// Package devstack starts the whole of Detour in one process on embedded defaults: a control plane
// on an embedded etcd, an in-process GCS-compatible store, the demo origin and an agent, with one
// target registered; or, with Regions, a bucket, a target and an agent in each region, all against
// the one control plane. `make run` and the end-to-end tests use it.
package devstack

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/controlplane"
	"github.com/detourhq/detour/internal/demoorigin"
	"github.com/detourhq/detour/internal/front/hgbundle"
	"github.com/detourhq/detour/internal/front/hgv2"
	"github.com/detourhq/detour/internal/front/hgweb"
	"github.com/detourhq/detour/internal/gcsemu"
	"github.com/detourhq/detour/internal/pki"
)

// Options say where things listen. Empty addresses pick free loopback ports.
type Options struct {
	DataDir string
	// PKIDir holds the development CA and certificates everything uses for mutual TLS, made if
	// absent (default DataDir/pki).
	PKIDir       string
	ControlPlane string // gRPC address
	CPMetrics    string
	Agent        string // HTTP address
	AgentMetrics string // agent's /metrics address; empty: none
	Origin       string // demo origin's HTTP address
	// OriginURL, if set, is an origin that is already running (an `hg serve`); no demo origin is
	// started.
	OriginURL string
	// RepoID names the origin's repository in content keys (default: the origin URL).
	RepoID  string
	GCSPort int
	// StoreDir, if set, keeps the GCS emulator's buckets, objects and holds on disk there, so that
	// a restarted stack redirects to what it stored before (`make run`: <data-dir>/gcs); empty: in
	// memory.
	StoreDir   string
	Region     string // default "local"
	Bucket     string // default "detour-demo"
	TargetName string // default "local-gcs"
	// Regions, if set, replace Region, Bucket and TargetName: each region gets a bucket
	// detour-<region>, a target <region>-gcs and an agent with a certificate of its own
	// (spiffe://detour/agent/<region>), listening at RegionAgents[i] (default: a free port; the
	// first falls back to Agent).
	Regions      []string
	RegionAgents []string
	ObjectSize   int    // demo origin's default response size (default 1 MiB)
	MinRedirect  uint64 // policy min_redirect_bytes
	// MinOccurrences is the policy's min_occurrences (0: 1, a fill on a key's first miss, so
	// that a key's second request is already a redirect).
	MinOccurrences uint32
	// ClaimRate is the control plane's fill claims per agent per second (0: its default;
	// negative: unbounded).
	ClaimRate    float64
	PlaceTimeout time.Duration
	// FaultFront serves the target's client-facing URL through a gcsemu.Front (Stack.Front), so
	// tests can make it fail.
	FaultFront bool
	// AgentConfig, if set, adjusts the agent core's configuration before it is built (tests);
	// V2Config the protocol-v2 front's.
	AgentConfig  func(*agent.Config)
	V2Config     func(*hgv2.Config)
	BundleConfig func(*hgbundle.Config)
	// Fronts, if set, makes the fronts the agents serve instead of the protocol-v2 front (tests of
	// the core, with a front of their own).
	Fronts func(*agent.Agent) ([]agent.Front, error)
	Log    *slog.Logger
}

// Stack is a running system.
type Stack struct {
	CP        *ControlPlane
	GCS       *gcsemu.Server
	Front     *gcsemu.Front // with Options.FaultFront
	Origin    *demoorigin.Origin
	Agent     *agent.Agent // the first region's
	V2        *hgv2.Front  // the first region's protocol-v2 front
	Bundles   *hgbundle.Front
	Store     *blob.Store
	OriginURL string
	AgentURL  string // the first region's
	// Regions are the regions' targets and agents, in the order of Options.Regions (one without).
	Regions []*Region
	Conn    *grpc.ClientConn
	Admin   pb.AdminServiceClient // as the development operator
	PKI     pki.DevPKI
	opts    Options

	originSrv *http.Server
	agentOps  string
	closers   []func()
}

// Region is one region's target and agent.
type Region struct {
	Name     string
	Bucket   string
	Target   string
	Agent    *agent.Agent
	V2       *hgv2.Front
	Bundles  *hgbundle.Front
	AgentURL string
	AgentID  string // its certificate identity
}

func listen(addr string) (net.Listener, error) {
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	return net.Listen("tcp", addr)
}

// Start brings the system up and registers the target.
func Start(ctx context.Context, o Options) (s *Stack, err error) {
	if o.Region == "" {
		o.Region = "local"
	}
	if o.Bucket == "" {
		o.Bucket = "detour-demo"
	}
	if o.TargetName == "" {
		o.TargetName = "local-gcs"
	}
	if o.ObjectSize == 0 {
		o.ObjectSize = 1 << 20
	}
	if o.ControlPlane == "" {
		o.ControlPlane = "127.0.0.1:0"
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	s = &Stack{opts: o}
	if o.PKIDir == "" {
		o.PKIDir = filepath.Join(o.DataDir, "pki")
	}
	if s.PKI, _, err = pki.EnsureDev(o.PKIDir); err != nil {
		return nil, fmt.Errorf("development PKI: %w", err)
	}
	defer func() {
		if err != nil {
			s.Close(context.Background())
		}
	}()
	if len(o.Regions) == 0 {
		s.Regions = []*Region{{Name: o.Region, Bucket: o.Bucket, Target: o.TargetName, AgentID: pki.AgentPrefix + "dev"}}
	}
	for _, r := range o.Regions {
		s.Regions = append(s.Regions, &Region{Name: r, Bucket: "detour-" + r, Target: r + "-gcs", AgentID: pki.AgentPrefix + r})
	}
	if s.GCS, err = gcsemu.StartWith(gcsemu.Options{Port: o.GCSPort, Dir: o.StoreDir}); err != nil {
		return nil, err
	}
	// The emulator publishes its buckets' notifications to the process's Pub/Sub emulator; the
	// control plane makes the topic, its subscription and the notifications, and follows them.
	pubsubAddr, err := gcsemu.PubSub()
	if err != nil {
		return nil, err
	}
	events := controlplane.StoreEventsConfig{Endpoint: pubsubAddr,
		Topic:        fmt.Sprintf("projects/detour-devstack/topics/store-%s", strings.ReplaceAll(s.GCS.Host(), ":", "-")),
		Subscription: fmt.Sprintf("projects/detour-devstack/subscriptions/controlplane-%s", strings.ReplaceAll(s.GCS.Host(), ":", "-"))}
	if o.FaultFront {
		if s.Front, err = s.GCS.StartFront(); err != nil {
			return nil, err
		}
	}
	for _, r := range s.Regions {
		s.GCS.CreateBucket(r.Bucket)
	}
	if s.CP, err = StartControlPlane(ctx, controlplane.Options{Listen: o.ControlPlane, MetricsListen: o.CPMetrics,
		DataDir: o.DataDir, Region: s.Regions[0].Name, GCSEndpoint: s.GCS.Endpoint(), Log: o.Log.With("component", "controlplane"),
		TLS: pki.Files{Cert: s.PKI.ControlPlane.Cert, Key: s.PKI.ControlPlane.Key, CA: s.PKI.CA.CA}, ClaimRate: o.ClaimRate,
		StoreEvents: events}); err != nil {
		return nil, err
	}
	if s.Conn, err = s.Dial(s.PKI.Operator); err != nil {
		return nil, err
	}
	s.Admin = pb.NewAdminServiceClient(s.Conn)
	if err := s.register(ctx); err != nil {
		return nil, err
	}
	if len(s.Regions) > 1 {
		s.waitHealthy(ctx, o.Log)
	}

	if o.OriginURL != "" {
		s.OriginURL = o.OriginURL
	} else {
		s.Origin = demoorigin.New(o.ObjectSize)
		ol, err := listen(o.Origin)
		if err != nil {
			return nil, fmt.Errorf("origin listener: %w", err)
		}
		s.OriginURL = "http://" + ol.Addr().String() + "/"
		s.originSrv = &http.Server{Handler: s.Origin, ReadHeaderTimeout: 10 * time.Second}
		go s.originSrv.Serve(ol)
	}

	if s.Store, err = blob.NewStore(ctx, blob.Options{Endpoint: s.GCS.Endpoint()}); err != nil {
		return nil, err
	}
	for i, r := range s.Regions {
		if err := s.startAgent(ctx, i, r); err != nil {
			return nil, fmt.Errorf("agent in region %s: %w", r.Name, err)
		}
	}
	s.Agent, s.V2, s.Bundles, s.AgentURL = s.Regions[0].Agent, s.Regions[0].V2, s.Regions[0].Bundles, s.Regions[0].AgentURL
	if o.AgentMetrics != "" {
		ml, err := listen(o.AgentMetrics)
		if err != nil {
			return nil, fmt.Errorf("agent metrics listener: %w", err)
		}
		s.agentOps = ml.Addr().String()
		go s.Agent.ServeOps(ml)
	}
	// Ready when every agent advertises the targets.
	deadline := time.Now().Add(10 * time.Second)
	for _, r := range s.Regions {
		for r.Agent.Targets() == nil || len(r.Agent.Targets().Live) == 0 {
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("agent in region %s did not receive the target set within 10s", r.Name)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return s, nil
}

// startAgent starts region i's agent, with a certificate of its own when there are several.
func (s *Stack) startAgent(ctx context.Context, i int, r *Region) error {
	o := s.opts
	originURL, err := url.Parse(s.OriginURL)
	if err != nil {
		return fmt.Errorf("origin URL: %w", err)
	}
	id, files := "devstack-agent", s.PKI.Agent
	if len(o.Regions) > 0 {
		id = "devstack-agent-" + r.Name
		ca, err := pki.LoadCA(s.PKI.Dir)
		if err != nil {
			return err
		}
		if files, err = ca.WriteLeaf(s.PKI.Dir, "agent-"+r.Name, pki.Leaf{Name: "agent-" + r.Name, URIs: []string{r.AgentID}}); err != nil {
			return err
		}
	}
	acfg := agent.Config{Origin: originURL, Region: r.Name, AgentID: id,
		PlaceTimeout: o.PlaceTimeout, ControlPlanes: []string{s.CP.Addr()}, Store: agent.BlobStore(s.Store),
		Access: hgweb.AccessProbe(originURL, nil), Log: o.Log.With("component", "agent", "region", r.Name)}
	creds, err := pki.ClientCredentials(files)
	if err != nil {
		return err
	}
	s.closers = append(s.closers, creds.Close)
	acfg.Credentials = creds
	if o.AgentConfig != nil {
		o.AgentConfig(&acfg)
	}
	if r.Agent, err = agent.New(ctx, acfg); err != nil {
		return err
	}
	if o.Fronts != nil {
		fronts, err := o.Fronts(r.Agent)
		if err != nil {
			return err
		}
		r.Agent.Mount(fronts...)
	} else {
		vcfg := hgv2.Config{RepoID: o.RepoID}
		if o.V2Config != nil {
			o.V2Config(&vcfg)
		}
		if r.V2, err = hgv2.New(r.Agent, vcfg); err != nil {
			return err
		}
		bcfg := hgbundle.Config{RepoID: o.RepoID}
		if o.BundleConfig != nil {
			o.BundleConfig(&bcfg)
		}
		if r.Bundles, err = hgbundle.New(r.Agent, bcfg); err != nil {
			return err
		}
		r.Agent.Mount(r.V2, r.Bundles)
	}
	addr := ""
	switch {
	case i < len(o.RegionAgents):
		addr = o.RegionAgents[i]
	case i == 0:
		addr = o.Agent
	}
	al, err := listen(addr)
	if err != nil {
		return fmt.Errorf("agent listener: %w", err)
	}
	r.AgentURL = "http://" + al.Addr().String() + "/"
	go r.Agent.Serve(al)
	return nil
}

// Dial connects to the control plane with the identity in files (one of s.PKI's), over mutual
// TLS; Close closes the credentials' file watchers.
func (s *Stack) Dial(files pki.Files) (*grpc.ClientConn, error) {
	creds, err := pki.ClientCredentials(files)
	if err != nil {
		return nil, err
	}
	s.closers = append(s.closers, creds.Close)
	return grpc.NewClient(s.CP.Addr(), grpc.WithTransportCredentials(creds))
}

// AgentMetricsAddr is the address of the agent's /metrics, /healthz and /readyz ("" if none).
func (s *Stack) AgentMetricsAddr() string { return s.agentOps }

// Target is the registration the stack makes (the first region's).
func (s *Stack) Target() *pb.Target { return s.TargetOf(s.Regions[0]) }

// TargetOf is region r's target registration.
func (s *Stack) TargetOf(r *Region) *pb.Target {
	public := s.GCS.PublicURL(r.Bucket)
	if s.Front != nil {
		public = s.Front.PublicURL(r.Bucket)
	}
	return &pb.Target{Name: r.Target, Protocol: "http", Uris: []string{public},
		Region: r.Name, Weight: 1, Store: &pb.GcsStore{Bucket: r.Bucket, Prefix: "objects/"},
		UrlForm: &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: public}}}
}

// waitHealthy waits (up to 30s) until the control plane's prober has found every region's target
// healthy. With several regions, a fill fails over from a region whose target is not healthy yet
// to one whose target is, so a region's first key could be stored in the other region.
func (s *Stack) waitHealthy(ctx context.Context, log *slog.Logger) {
	deadline := time.Now().Add(30 * time.Second)
	for _, r := range s.Regions {
		for {
			got, err := s.Admin.GetTarget(ctx, &pb.GetTargetRequest{Name: s.TargetOf(r).Name})
			if err == nil && got.Target.Healthy {
				break
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				log.Warn("a target is not healthy yet; fills go to another region until it is", "target", s.TargetOf(r).Name, "err", err)
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

func (s *Stack) register(ctx context.Context) error {
	for _, r := range s.Regions {
		if err := s.registerTarget(ctx, s.TargetOf(r)); err != nil {
			return err
		}
	}
	cur, err := s.Admin.GetPolicy(ctx, &pb.GetPolicyRequest{})
	if err != nil {
		return err
	}
	p := cur.Policy
	before := proto.Clone(p)
	p.MinOccurrences = max(s.opts.MinOccurrences, 1)
	if s.opts.MinRedirect > 0 {
		p.MinRedirectBytes = s.opts.MinRedirect
	}
	if !proto.Equal(p, before) {
		if _, err := s.Admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: p}); err != nil {
			return fmt.Errorf("set policy: %w", err)
		}
		// A read waits for this replica's snapshot to include the write: the first Place that
		// follows is answered under the new policy.
		if _, err := s.Admin.GetPolicy(ctx, &pb.GetPolicyRequest{}); err != nil {
			return err
		}
	}
	return nil
}

// registerTarget creates t, or brings a registration of the same name from an earlier run (a
// persistent data dir) up to date.
func (s *Stack) registerTarget(ctx context.Context, t *pb.Target) error {
	_, err := s.Admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: t})
	if err == nil {
		return nil
	}
	got, gerr := s.Admin.GetTarget(ctx, &pb.GetTargetRequest{Name: t.Name})
	if gerr != nil {
		return fmt.Errorf("register target %s: %w", t.Name, err)
	}
	t.Revision = got.Target.Revision
	if _, err := s.Admin.UpdateTarget(ctx, &pb.UpdateTargetRequest{Target: t}); err != nil {
		return fmt.Errorf("update target %s: %w", t.Name, err)
	}
	return nil
}

// Close stops everything: the agents' servers (letting responses finish), their fills, the origin,
// the control plane and the store.
func (s *Stack) Close(ctx context.Context) {
	for _, r := range s.Regions {
		if r.Agent != nil {
			r.Agent.Shutdown(ctx)
		}
	}
	if s.originSrv != nil {
		s.originSrv.Shutdown(ctx)
	}
	if s.Conn != nil {
		s.Conn.Close()
	}
	if s.CP != nil {
		s.CP.Shutdown(ctx)
	}
	if s.Store != nil {
		s.Store.Close()
	}
	if s.Front != nil {
		s.Front.Close()
	}
	if s.GCS != nil {
		s.GCS.Stop()
	}
	for _, c := range s.closers {
		c()
	}
}
