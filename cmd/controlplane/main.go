// Command controlplane runs Detour's control plane: the Placement and Admin gRPC services over an
// etcd cluster, or over an embedded etcd when no endpoints are given.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/detourhq/detour/internal/blob"
	"github.com/detourhq/detour/internal/controlplane"
	"github.com/detourhq/detour/internal/envflag"
	"github.com/detourhq/detour/internal/etcdembed"
	"github.com/detourhq/detour/internal/flagcheck"
	"github.com/detourhq/detour/internal/memlimit"
	"github.com/detourhq/detour/internal/pki"
	"github.com/detourhq/detour/internal/targets"
)

func main() {
	var (
		o           controlplane.Options
		endpoints   string
		signingKey  string
		logLevel    string
		verifyFills string
		drain       time.Duration
		pkiDir      string
		etcdPwFile  string
		pprofListen string
	)
	flag.StringVar(&o.Listen, "listen", "127.0.0.1:7700", "gRPC listen address")
	flag.StringVar(&o.MetricsListen, "metrics-listen", "127.0.0.1:7701", "Prometheus /metrics listen address (empty: none)")
	flag.StringVar(&endpoints, "etcd-endpoints", "", "comma-separated etcd client URLs; empty starts an embedded etcd in --data-dir")
	flag.StringVar(&o.EtcdPrefix, "etcd-prefix", targets.DefaultPrefix, "etcd key prefix for Detour's state")
	flag.StringVar(&o.DataDir, "data-dir", "detour-data", "directory of the embedded etcd")
	flag.StringVar(&o.EmbeddedEtcdURL, "embedded-etcd-listen", "", "client URL of the embedded etcd, https:// (mutual TLS with its own CA in <data-dir>/etcd-pki; default: a free loopback port)")
	flag.Int64Var(&o.EmbeddedEtcdQuota, "embedded-etcd-quota", etcdembed.DefaultQuotaBytes, "space quota of the embedded etcd's database, in bytes (16 MiB to 8 GiB)")
	flag.StringVar(&o.Checkpoint, "checkpoint", "", `file the replica writes its object index to and starts from, reading only etcd's history since it (default <data-dir>/index.checkpoint; "none": every start reads every record from etcd)`)
	flag.Int64Var(&o.EtcdCopyMaxBytes, "etcd-copy-max-bytes", controlplane.DefaultEtcdCopyMaxBytes, "with --etcd-endpoints, a replica that reads every record (its first start, or a checkpoint it cannot use) reads a copy of etcd's database, written beside --checkpoint (else in --data-dir) and removed once read, when that database is at most this size (0: it reads by range; the copy holds every prefix of a shared etcd, and needs the root role when etcd has authentication on)")
	flag.StringVar(&o.RecordEncoding, "record-encoding", "", "how object records are written: home-ref (each names a shared home record: about half the bytes of compact), compact (each holds its home), or proto (for releases before compact records); every replica of this release reads all three, releases before it skip home-ref records. Empty: home-ref with the embedded etcd, compact with --etcd-endpoints (set home-ref once no replica of an older release shares the prefix)")
	flag.DurationVar(&o.CheckpointInterval, "checkpoint-interval", controlplane.DefaultCheckpointInterval, "how often the checkpoint is rewritten while serving, besides when the replica stops (negative: only then); keep it under --compact-interval, or a crash leaves a checkpoint etcd's history no longer reaches")
	flag.DurationVar(&o.Etcd.CompactInterval, "compact-interval", 5*time.Minute, "how often the elected janitor compacts etcd's history to the revision it saw one interval earlier (negative: never, for an etcd that compacts itself)")
	flag.StringVar(&o.Region, "region", "", "this replica's region (for logs)")
	flag.StringVar(&signingKey, "signing-key", "", "service-account JSON key that signs V4 URLs for targets that want them")
	flag.StringVar(&o.GCSEndpoint, "gcs-endpoint", "", "GCS API endpoint (an emulator); empty: Google Cloud Storage with the standard Google credentials. Fills are verified, targets probed and retired objects deleted through it")
	flag.StringVar(&o.StoreEvents.Subscription, "store-events-subscription", "", "Pub/Sub subscription (projects/P/subscriptions/S) of the targets' bucket change notifications: a replaced or deleted object's record is retired within seconds (empty: only the reconcile and agents' checks find them)")
	flag.StringVar(&o.StoreEvents.Topic, "store-events-topic", "", "Pub/Sub topic (projects/P/topics/T): make it, the subscription and each target bucket's notification to it when missing (empty: they are set up by the operator)")
	flag.StringVar(&o.StoreEvents.Endpoint, "pubsub-endpoint", "", "host:port of a Pub/Sub emulator, plaintext (empty: PUBSUB_EMULATOR_HOST, else Pub/Sub with the standard Google credentials)")
	flag.StringVar(&verifyFills, "verify-fills", "attrs", "how reported fills are verified before READY: attrs (size, CRC32C, generation and recorded hashes from the store), full (also re-read and re-hash the bytes), or a fraction 0..1 of fills to verify in full")
	flag.DurationVar(&o.Janitor.SweepInterval, "sweep-interval", 30*time.Second, "how often expired and stale records are retired and their stored bytes deleted")
	flag.DurationVar(&o.Janitor.ReconcileInterval, "reconcile-interval", 10*time.Minute, "how often each target's bucket is listed against the index (missing objects, orphans)")
	flag.Float64Var(&o.Janitor.MaxRetireShare, "reconcile-max-retire-share", controlplane.DefaultMaxRetireShare, "share of a target's records one reconcile round, or a replica's listing at start, may retire (at least 3 records): a listing that misses more retires none and says so; the same share of the listed objects bounds the orphans one reconcile deletes (above 0, at most 1; 1 turns the checks off)")
	flag.DurationVar(&o.Janitor.ProbeInterval, "probe-interval", 2*time.Second, "how often each target's client-facing URL is probed")
	flag.IntVar(&o.Janitor.ProbeFailures, "probe-failures", 3, "consecutive probe failures that make a target unhealthy")
	flag.IntVar(&o.Janitor.ProbeRecoveries, "probe-recoveries", 2, "consecutive probe successes that make an unhealthy target healthy again")
	flag.IntVar(&o.Janitor.GarbageBatch, "garbage-batch", 500, "stored objects deleted per sweep at most")
	flag.DurationVar(&o.Janitor.GarbageGrace, "garbage-grace", 15*time.Second, "how long a retired object's bytes stay before deletion, so every agent has dropped its cached redirect first")
	flag.DurationVar(&o.RedirectCacheMaxAge, "redirect-cache-max-age", time.Minute, "how long agents may reuse a redirect without asking (negative: no caching)")
	flag.DurationVar(&o.AgentLagThreshold, "agent-lag-threshold", controlplane.DefaultAgentLagThreshold, "flag an agent (detourctl agents ls, detour_agents_lagging) whose applied target set is behind this long")
	flag.StringVar(&o.TLS.Cert, "tls-cert", "", "server certificate (PEM); re-read when the file changes")
	flag.StringVar(&o.TLS.Key, "tls-key", "", "server certificate's key (PEM)")
	flag.StringVar(&o.TLS.CA, "client-ca", "", "CA certificates that client certificates must chain to (mutual TLS)")
	flag.StringVar(&pkiDir, "dev-pki", "", "without --tls-*: a development CA and certificates in this directory, made if absent (default: <data-dir>/pki)")
	flag.BoolVar(&o.Insecure, "insecure", false, "serve gRPC in plaintext with no authentication or authorization (development only)")
	flag.StringVar(&o.AuthzPolicyFile, "authz-policy", "", "gRPC authorization policy (JSON), re-read when it changes; empty: the built-in policy (agents Placement, operators Admin, readers Get/List)")
	flag.StringVar(&o.AdminListen, "admin-listen", "", "serve AdminService on its own address (empty: on --listen)")
	flag.Float64Var(&o.ClaimRate, "claim-rate", 100, "fill claims each agent may take per second (negative: unbounded)")
	flag.IntVar(&o.ClaimBurst, "claim-burst", 200, "fill claims an agent may take at once above --claim-rate")
	flag.IntVar(&o.ClaimsInFlight, "claims-in-flight", 2, "fill-claim transactions under way at once; claims arriving meanwhile share the next (negative: a transaction per claim)")
	flag.StringVar(&o.EtcdTLS.CA, "etcd-cacert", "", "CA that etcd's server certificate chains to")
	flag.StringVar(&o.EtcdTLS.Cert, "etcd-cert", "", "client certificate for etcd")
	flag.StringVar(&o.EtcdTLS.Key, "etcd-key", "", "client certificate's key for etcd")
	flag.StringVar(&o.EtcdUsername, "etcd-username", "", "etcd user (with --etcd-password-file)")
	flag.StringVar(&etcdPwFile, "etcd-password-file", "", "file holding the etcd user's password")
	flag.StringVar(&pprofListen, "pprof-listen", "", "listen address of /debug/pprof/ (empty: none)")
	flag.Float64Var(&o.Janitor.CopyRate, "copy-rate", 5, "server-side copies the elected janitor starts per second at most: draining targets' sole copies and cross-region copies together")
	flag.DurationVar(&o.Janitor.CopyInterval, "copy-interval", 2*time.Second, "how often each replica queues the cross-region copies its redirect counts call for, and the janitor works through copies")
	flag.IntVar(&o.Janitor.HotKeys, "hot-keys", 100000, "(key, region) pairs each replica counts cross-region redirects for (about 120 bytes each)")
	flag.IntVar(&o.GCPercent, "gc-percent", 50, "the Go collector's target (as GOGC) once an index is first served (a provisional one included): the process grows to about 1+N/100 times its live heap between collections (0: the runtime's; a GOGC variable wins)")
	earlyWalk := flag.Bool("early-walk", true, "with the embedded etcd: at a start with no clean stop to serve, copy etcd's database file before etcd opens it and serve redirects from a walk of the copy while etcd restarts (false: such a start serves nothing until etcd is up)")
	flag.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	flag.DurationVar(&drain, "shutdown-timeout", 10*time.Second, "how long in-flight RPCs may run after SIGTERM")
	flag.Parse()
	if err := envflag.Apply(flag.CommandLine, "DETOUR_"); err != nil {
		fmt.Fprintf(os.Stderr, "controlplane: %v\n", err)
		os.Exit(2)
	}
	o.NoEarlyWalk = !*earlyWalk

	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "controlplane: --log-level: %v\n", err)
		os.Exit(2)
	}
	o.Log = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	memlimit.Set(o.Log, memlimit.FromCgroup)
	if os.Getenv("GOGC") != "" && o.GCPercent != 0 {
		o.Log.Info("GOGC is set: --gc-percent is not applied", "GOGC", os.Getenv("GOGC"), "gc_percent", o.GCPercent)
		o.GCPercent = 0
	}
	if endpoints != "" {
		o.EtcdEndpoints = strings.Split(endpoints, ",")
	}
	switch {
	case o.EtcdCopyMaxBytes < 0:
		fmt.Fprintf(os.Stderr, "controlplane: --etcd-copy-max-bytes: %d is negative (0 turns copies off)\n", o.EtcdCopyMaxBytes)
		os.Exit(2)
	case o.EtcdCopyMaxBytes == 0:
		o.EtcdCopyMaxBytes = -1 // Options' zero is the default; the flag's is off
	}
	if o.RecordEncoding != "" {
		if _, err := targets.ParseRecordEncoding(o.RecordEncoding); err != nil {
			fmt.Fprintf(os.Stderr, "controlplane: --record-encoding: %v\n", err)
			os.Exit(2)
		}
	}
	switch o.Checkpoint {
	case "":
		o.Checkpoint = filepath.Join(o.DataDir, "index.checkpoint")
	case "none":
		o.Checkpoint = ""
	}
	switch verifyFills {
	case "attrs":
	case "full":
		o.VerifyFullFraction = 1
	default:
		f, err := strconv.ParseFloat(verifyFills, 64)
		if err != nil || flagcheck.Fraction("verify-fills", f) != nil {
			fmt.Fprintf(os.Stderr, "controlplane: --verify-fills: %q is not attrs, full or a fraction between 0 and 1\n", verifyFills)
			os.Exit(2)
		}
		o.VerifyFullFraction = f
	}
	if etcdPwFile != "" {
		pw, err := os.ReadFile(etcdPwFile)
		if err != nil {
			o.Log.Error("cannot read --etcd-password-file", "err", err)
			os.Exit(2)
		}
		o.EtcdPassword = strings.TrimRight(string(pw), "\r\n")
	}
	if !o.Insecure && o.TLS == (pki.Files{}) {
		if pkiDir == "" {
			pkiDir = filepath.Join(o.DataDir, "pki")
		}
		dev, made, err := pki.EnsureDev(pkiDir)
		if err != nil {
			o.Log.Error("cannot make a development PKI; give --tls-cert, --tls-key and --client-ca", "dir", pkiDir, "err", err)
			os.Exit(2)
		}
		o.TLS = pki.Files{Cert: dev.ControlPlane.Cert, Key: dev.ControlPlane.Key, CA: dev.CA.CA}
		o.Log.Warn("no --tls-cert: serving with a development CA; give your own certificates in production",
			"dir", pkiDir, "generated", made, "operator_cert", dev.Operator.Cert, "agent_cert", dev.Agent.Cert)
	}
	if err := o.StoreEvents.Validate(); err != nil {
		fmt.Fprintf(os.Stderr, "controlplane: --store-events-*: %v\n", err)
		os.Exit(2)
	}
	if err := checkOptions(&o); err != nil {
		fmt.Fprintf(os.Stderr, "controlplane: %v\n", err)
		os.Exit(2)
	}
	if signingKey != "" {
		s, err := blob.LoadServiceAccount(signingKey)
		if err != nil {
			o.Log.Error("cannot load --signing-key", "err", err)
			os.Exit(2)
		}
		o.Signer = s
	}

	os.Exit(run(o, drain, pprofListen))
}

// run builds the control plane, serves it until a signal or a failure, and shuts it down within
// drain; it returns the exit code.
func run(o controlplane.Options, drain time.Duration, pprofListen string) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if pprofListen != "" {
		// Before the start: a slow start is what one most wants to profile.
		go servePprof(pprofListen, o.Log)
	}
	// No deadline on building or loading: however large the snapshot, the control plane serves
	// (inline, health NOT_SERVING) while it loads, and a signal still stops it.
	srv, err := controlplane.New(ctx, o)
	if err != nil {
		o.Log.Error("control plane failed to start", "err", err)
		return 1
	}
	served := make(chan error, 1)
	go func() { served <- srv.ListenAndServe() }()
	code := 0
	select {
	case <-ctx.Done():
		o.Log.Info("shutting down", "timeout", drain.String())
	case err := <-served:
		o.Log.Error("control plane failed", "err", err)
		code = 1
	}
	sctx, scancel := context.WithTimeout(context.Background(), drain)
	defer scancel()
	if err := srv.Shutdown(sctx); err != nil {
		o.Log.Warn("shutdown cut short", "err", err)
	}
	if code == 0 {
		<-served // ErrServerClosed
	}
	return code
}

// servePprof serves the runtime's profiles; it lives as long as the process.
func servePprof(addr string, log *slog.Logger) {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	if err := srv.ListenAndServe(); err != nil {
		log.Error("--pprof-listen failed", "err", err)
	}
}
