// Command startload measures how a control plane starts with many object records: it prepares a
// data directory holding N READY records in the registry's real key layout and encoding (written
// through targets.Registry, one record per etcd write as fills write them), then starts control-
// plane binaries on copies of it and times each from process start to the first Place answered
// with a redirect, with the process's RSS and Go heap at that moment and a little later. From the
// control plane's log it also reports how long a walk of the embedded etcd's database file took
// (served while etcd restarts), when that etcd was up, how long the load or resume took by its own
// account, when the snapshot was current, and when every target's records were confirmed against
// its bucket (the store guard's listings; since process start).
//
// With -burst it then measures Place latency idle and while a writer on the same machine writes
// a burst of new records, and how long the watch takes to catch up after the last write; first
// the same burst under a prefix the control plane does not watch, as the baseline (what the etcd
// writes and the writer cost the shared machine without the control plane applying them).
//
// The control plane's GCS endpoint is a front (storeFront) that answers for every record's object
// as a store holding them would (metadata and listings), so that the store guard's checks at start
// find the records intact instead of retiring them, at no cost of storing the objects.
//
// With -etcd external the etcd runs in a process of its own (this command, re-executed with
// -serve-etcd), so the control plane's figures are its own.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/bench/loadstat"
	"github.com/detourhq/detour/internal/etcdembed"
	"github.com/detourhq/detour/internal/gcsemu"
	"github.com/detourhq/detour/internal/targets"
)

var (
	records   = flag.Int("records", 100_000, "READY object records in the data set")
	dataset   = flag.String("dataset", "", "directory of the data set (prepared when absent): meta.json and data/, the control plane's --data-dir")
	encoding  = flag.String("encoding", "home-ref", "record encoding when preparing: home-ref (records name shared home records), compact (each holds its home), or proto (what releases before the compact encoding wrote)")
	nTargets  = flag.Int("targets", 10, "targets the records are spread over, when preparing")
	writers   = flag.Int("writers", 64, "concurrent writes when preparing and in a burst")
	binaries  = flag.String("binaries", "", "comma-separated label=path of control-plane binaries to start, in turn, on copies of the data set")
	runs      = flag.Int("runs", 3, "starts of each binary")
	etcdMode  = flag.String("etcd", "embedded", "embedded (the control plane's own) or external (a process of its own)")
	settle    = flag.Duration("settle", 20*time.Second, "after the first redirect, measure memory again this much later (0: not)")
	burst     = flag.Int("burst", 0, "after the start, measure Place idle and while this many new records are written")
	burstRate = flag.Float64("burst-rate", 0, "records per second a burst writes at most (0: as fast as -writers go)")
	burstConc = flag.Int("place-concurrency", 4, "concurrent Place calls while measuring latency")
	measure   = flag.Duration("measure", 10*time.Second, "how long Place latency is measured idle")
	windows   = flag.Duration("place-windows", 0, "after the first redirect, call Place throughout the settle and report its latency in windows this long, marked when a reconcile round ran (0: not)")
	keepRun   = flag.Bool("keep", false, "keep each run's copy of the data directory")
	resume    = flag.Bool("resume", false, "measure starts from a checkpoint: each run first starts the binary once on its copy (not measured) and stops it, leaving its checkpoint there")
	workDir   = flag.String("work", "", "where runs copy the data set (default: beside it)")
	serveEtcd = flag.String("serve-etcd", "", "internal: serve an etcd on this data directory (-etcd-url) until killed")
	etcdURL   = flag.String("etcd-url", "", "internal: client URL for -serve-etcd and -write-prefix")
	// A burst's writer is a process of its own, as a fleet's writers are, so that the Place
	// client measuring latency does not share its Go runtime with the writer's goroutines.
	writePrefix = flag.String("write-prefix", "", "internal: write -burst records, numbered from -write-from, under this prefix of the etcd at -etcd-url (data directory -write-data), then exit")
	writeFrom   = flag.Int("write-from", 0, "internal: see -write-prefix")
	writeData   = flag.String("write-data", "", "internal: see -write-prefix")
)

// meta describes a prepared data set.
type meta struct {
	Records  int      `json:"records"`
	Encoding string   `json:"encoding"`
	GCSPort  int      `json:"gcs_port"`
	Targets  []string `json:"targets"`
	Buckets  []string `json:"buckets"`
	Revision int64    `json:"revision"`
}

func main() {
	flag.Parse()
	if *serveEtcd != "" {
		runEtcd(*serveEtcd, *etcdURL)
		return
	}
	if *writePrefix != "" {
		writeRecords()
		return
	}
	if *dataset == "" {
		check(errors.New("-dataset is required"))
	}
	ctx := context.Background()
	m := loadMeta(*dataset)
	var gcs *gcsemu.Server
	if m == nil {
		port := freePort()
		var err error
		gcs, err = gcsemu.Start(port)
		check(err)
		m = prepare(ctx, gcs, port)
	} else {
		var err error
		gcs, err = gcsemu.Start(m.GCSPort)
		check(err)
	}
	defer gcs.Stop()
	for _, b := range m.Buckets {
		gcs.CreateBucket(b)
	}
	api := storeFront(m.GCSPort, m)
	db, _ := os.Stat(filepath.Join(*dataset, "data", "etcd", "member", "snap", "db"))
	fmt.Printf("startload: %d records (%s encoding), %d targets, etcd db %.0f MB, etcd %s; host %d CPUs, %s, load average %s\n",
		m.Records, m.Encoding, len(m.Targets), float64(db.Size())/1e6, *etcdMode, runtime.NumCPU(),
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), loadAvg())
	if *binaries == "" {
		return
	}
	var bins [][2]string
	for _, lb := range strings.Split(*binaries, ",") {
		label, path, ok := strings.Cut(lb, "=")
		if !ok {
			check(fmt.Errorf("-binaries: %q is not label=path", lb))
		}
		bins = append(bins, [2]string{label, path})
	}
	fmt.Printf("%-8s %-4s %12s %8s %8s %8s %8s %9s %9s %10s %10s %10s %10s %12s  %s\n", "binary", "run", "first redir", "walk", "etcd up", "load", "current", "confirmed", "CPU", "RSS", "anon", "file", "heap", "etcd RSS/CPU", "after settle (RSS/anon/heap)")
	// Binaries alternate within each round, so a noisy stretch of the machine hits all of them.
	for r := 1; r <= *runs; r++ {
		for _, b := range bins {
			startOnce(ctx, m, api, b[0], b[1], r)
		}
	}
}

// prepare writes the data set: targets, their health verdicts, and the records.
func prepare(ctx context.Context, gcs *gcsemu.Server, port int) *meta {
	m := &meta{Records: *records, Encoding: *encoding, GCSPort: port}
	dir := filepath.Join(*dataset, "data", "etcd")
	check(os.MkdirAll(dir, 0o755))
	e, err := etcdembed.Start(ctx, etcdembed.Config{Dir: dir})
	check(err)
	defer e.Close()
	cli, err := clientv3.New(e.ClientConfig())
	check(err)
	defer cli.Close()
	reg := targets.NewRegistry(cli, "")
	enc, err := targets.ParseRecordEncoding(*encoding)
	check(err)
	reg.SetRecordEncoding(enc)
	var ts []*pb.Target
	for i := range *nTargets {
		name := fmt.Sprintf("target-%02d", i)
		bucket := "startload-" + name
		gcs.CreateBucket(bucket)
		t, err := reg.CreateTarget(ctx, &pb.Target{Name: name, Protocol: "http", Uris: []string{gcs.PublicURL(bucket)},
			Region: []string{"us", "eu"}[i%2], Weight: 1, State: pb.TargetState_TARGET_STATE_ACTIVE,
			Store:   &pb.GcsStore{Bucket: bucket, Prefix: objectPrefix},
			UrlForm: &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: gcs.PublicURL(bucket)}}})
		check(err)
		// The verdict a prober left before the restart being measured.
		check(reg.SetHealth(ctx, &pb.TargetHealth{Target: name, TargetUid: t.Uid, Healthy: true, Since: timestamppb.Now()}))
		ts = append(ts, t)
		m.Targets, m.Buckets = append(m.Targets, name), append(m.Buckets, bucket)
	}
	start := time.Now()
	inParallel(*writers, *records, func(i int) {
		check(reg.PutObject(ctx, record(i, ts[i%len(ts)])))
		if i%100_000 == 0 && i > 0 {
			fmt.Printf("prepare: %d records in %s\n", i, time.Since(start).Round(time.Second))
		}
	})
	resp, err := cli.Get(ctx, "/")
	check(err)
	m.Revision = resp.Header.Revision
	fmt.Printf("prepare: %d records in %s (%.0f/s)\n", *records, time.Since(start).Round(time.Second),
		float64(*records)/time.Since(start).Seconds())
	b, err := json.MarshalIndent(m, "", "  ")
	check(err)
	check(os.WriteFile(filepath.Join(*dataset, "meta.json"), b, 0o644))
	return m
}

// key is record i's content key: a real SHA-256.
func key(i int) string {
	sum := sha256.Sum256([]byte("startload record " + strconv.Itoa(i)))
	return hex.EncodeToString(sum[:])
}

// record is record i at target t, as a verified fill writes it. Its object's size, generation and
// CRC32C follow from its key (objectAttrs), so that the store front can answer for every object.
func record(i int, t *pb.Target) *pb.StoredObject {
	k := key(i)
	body := []byte(k)
	s256, s1 := sha256.Sum256(body), sha1.Sum(body)
	size, gen, crc := objectAttrs(k)
	created := time.Now()
	return &pb.StoredObject{Key: k, Target: t.Name, State: pb.ObjectState_OBJECT_STATE_READY,
		Size: size, MediaType: mediaType,
		Sha256: s256[:], Sha1: s1[:], Created: timestamppb.New(created), Expires: timestamppb.New(created.Add(30 * 24 * time.Hour)),
		ObjectName: t.Store.Prefix + k, Bucket: t.Store.Bucket, Generation: gen,
		Crc32C: crc, TargetUid: t.Uid}
}

const (
	mediaType    = "application/mercurial-cbor"
	objectPrefix = "objects/"
)

// objectAttrs are the size, generation and CRC32C of the stored object of key k.
func objectAttrs(k string) (size uint64, generation int64, crc32c uint32) {
	h := sha256.Sum256([]byte("startload object " + k))
	return 4096 + binary.BigEndian.Uint64(h[0:8])%(8<<20), int64(binary.BigEndian.Uint64(h[8:16])>>12) + 1,
		binary.BigEndian.Uint32(h[16:20])
}

// etcdClient reaches the data set's etcd, embedded in the control plane or external, at
// endpoint: both keep their data in data/etcd, hence their certificates in data/etcd-pki.
func etcdClient(endpoint, data string) *clientv3.Client {
	cfg, err := etcdembed.ClientConfigFor(endpoint, etcdPKI(data))
	check(err)
	cli, err := clientv3.New(cfg)
	check(err)
	return cli
}

func etcdPKI(data string) string { return filepath.Join(data, "etcd-pki") }

func loadMeta(dir string) *meta {
	b, err := os.ReadFile(filepath.Join(dir, "meta.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	check(err)
	m := &meta{}
	check(json.Unmarshal(b, m))
	return m
}

// storeFront is the control plane's GCS endpoint: fake-gcs-server behind a front that answers, for
// the data set's buckets, what a real store holding every record's object would answer — object
// metadata (a record checked one by one before its first redirect) and listings (the check of a
// whole target at start, with only the attributes the listing selects, as GCS sends them) —
// without storing millions of objects. Anything else (the prober's canary) goes to fake-gcs-server.
func storeFront(port int, m *meta) string {
	target, err := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", port))
	check(err)
	proxy := httputil.NewSingleHostReverseProxy(target)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	buckets := map[string]int{}
	for i, b := range m.Buckets {
		buckets[b] = i
	}
	go http.Serve(l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { //nolint:errcheck // lives as long as the process
		rest, ok := strings.CutPrefix(r.URL.Path, "/storage/v1/b/")
		if r.Method != http.MethodGet || !ok {
			proxy.ServeHTTP(w, r)
			return
		}
		bucket, object, _ := strings.Cut(rest, "/o")
		ti, ours := buckets[bucket]
		switch object = strings.TrimPrefix(object, "/"); {
		case !ours:
		case object == "" && r.URL.Query().Get("prefix") == objectPrefix:
			listPage(w, r, m, bucket, ti)
			return
		case strings.HasPrefix(object, objectPrefix) && len(object) == len(objectPrefix)+64:
			writeJSON(w, objectJSON(bucket, object))
			return
		}
		proxy.ServeHTTP(w, r)
	}))
	return "http://" + l.Addr().String() + "/storage/v1/"
}

// listPage answers one page of the listing of target ti's records, in record order.
func listPage(w http.ResponseWriter, r *http.Request, m *meta, bucket string, ti int) {
	from, _ := strconv.Atoi(r.URL.Query().Get("pageToken"))
	max, _ := strconv.Atoi(r.URL.Query().Get("maxResults"))
	if max <= 0 || max > 1000 {
		max = 1000
	}
	n := len(m.Buckets)
	i := from*n + ti
	items := make([]map[string]any, 0, max)
	for ; i < m.Records && len(items) < max; i += n {
		items = append(items, objectJSON(bucket, objectPrefix+key(i)))
	}
	// GCS sends only the attributes a listing selects (fields=items(name,size,…),nextPageToken).
	gcsemu.SelectListed(r.URL.Query().Get("fields"), items)
	page := map[string]any{"kind": "storage#objects", "items": items}
	if i < m.Records {
		page["nextPageToken"] = strconv.Itoa(i / n)
	}
	writeJSON(w, page)
}

func objectJSON(bucket, name string) map[string]any {
	size, gen, crc := objectAttrs(strings.TrimPrefix(name, objectPrefix))
	var c [4]byte
	binary.BigEndian.PutUint32(c[:], crc)
	return map[string]any{"kind": "storage#object", "bucket": bucket, "name": name,
		"generation": strconv.FormatInt(gen, 10), "metageneration": "1", "size": strconv.FormatUint(size, 10),
		"crc32c": base64.StdEncoding.EncodeToString(c[:]), "contentType": mediaType,
		"timeCreated": "2026-01-01T00:00:00Z", "updated": "2026-01-01T00:00:00Z", "storageClass": "STANDARD"}
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// proc is a started process and how it is measured.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func startProc(log string, name string, args ...string) *proc {
	f, err := os.Create(log)
	check(err)
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = f, f
	// A driver that fails (check exits) leaves no control plane or etcd running on the machine
	// to disturb the next measurement.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	check(cmd.Start())
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); f.Close(); close(p.done) }()
	return p
}

func (p *proc) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// startOnce starts one binary on a fresh copy of the data set and measures it.
func startOnce(ctx context.Context, m *meta, api, label, bin string, run int) {
	work := *workDir
	if work == "" {
		work = filepath.Dir(filepath.Clean(*dataset))
	}
	dir, err := os.MkdirTemp(work, "run-")
	check(err)
	if !*keepRun {
		defer os.RemoveAll(dir)
	}
	out, err := exec.Command("cp", "-a", filepath.Join(*dataset, "data"), dir).CombinedOutput()
	if err != nil {
		check(fmt.Errorf("copy the data set: %v: %s", err, out))
	}
	data := filepath.Join(dir, "data")
	// The page cache holds what was just copied; every binary starts on an equally warm copy.
	listen, metrics, etcdListen := freeAddr(), freeAddr(), "https://"+freeAddr()
	args := []string{"--insecure", "--listen", listen, "--metrics-listen", metrics, "--data-dir", data,
		"--gcs-endpoint", api, "--log-level", "info"}
	var etcd *proc
	if *etcdMode == "external" {
		self, err := os.Executable()
		check(err)
		etcd = startProc(filepath.Join(dir, "etcd.log"), self, "-serve-etcd", filepath.Join(data, "etcd"), "-etcd-url", etcdListen)
		defer etcd.stop()
		e0 := time.Now()
		waitEtcd(ctx, etcdListen, data)
		em := memOf(etcd.cmd.Process.Pid, "")
		fmt.Printf("%-8s %-4d external etcd ready in %.2fs, CPU %.1fs, RSS %s (anon %s, file %s)\n", label, run,
			time.Since(e0).Seconds(), em.cpu.Seconds(), mb(em.rss), mb(em.anon), mb(em.file))
		c := etcdembed.PKIFiles(etcdPKI(data)).Client
		args = append(args, "--etcd-endpoints", etcdListen, "--etcd-cacert", c.CA, "--etcd-cert", c.Cert, "--etcd-key", c.Key)
	} else {
		args = append(args, "--embedded-etcd-listen", etcdListen)
	}
	// Reconnects every 20 ms while nothing listens: the default backoff grows to two minutes and
	// would hide when the server started answering.
	conn, err := grpc.NewClient(listen, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1,
			MaxDelay: 20 * time.Millisecond}, MinConnectTimeout: time.Second}))
	check(err)
	defer conn.Close()
	place := pb.NewPlacementServiceClient(conn)
	req := func(k string) *pb.PlaceRequest {
		return &pb.PlaceRequest{Key: k, Command: "manifestdata", AcceptedTargets: m.Targets, Hashes: []string{"sha256"},
			AgentRegion: "us", AgentId: "startload"}
	}
	if *resume {
		// A start that is not measured, stopped as an operator stops a replica: it leaves its
		// checkpoint in the data directory.
		t0 := time.Now()
		prep := startProc(filepath.Join(dir, "controlplane-prep.log"), bin, args...)
		if _, ok := firstRedirect(ctx, place, req(key(m.Records-1)), prep, t0); !ok {
			fmt.Printf("%-8s %-4d exited before a redirect (log: %s)\n", label, run, filepath.Join(dir, "controlplane-prep.log"))
			return
		}
		prep.stop()
		if _, err := os.Stat(filepath.Join(data, "index.checkpoint")); err != nil {
			check(fmt.Errorf("%s: no checkpoint after a start and stop: %w", label, err))
		}
	}
	t0 := time.Now()
	cp := startProc(filepath.Join(dir, "controlplane.log"), bin, args...)
	defer cp.stop()
	first, ok := firstRedirect(ctx, place, req(key(m.Records-1)), cp, t0)
	if !ok {
		fmt.Printf("%-8s %-4d exited before a redirect (log: %s)\n", label, run, filepath.Join(dir, "controlplane.log"))
		return
	}
	at := memOf(cp.cmd.Process.Pid, metrics)
	etcdRSS := ""
	if etcd != nil {
		em := memOf(etcd.cmd.Process.Pid, "")
		etcdRSS = fmt.Sprintf("%s/%.0fs", mb(em.rss), em.cpu.Seconds())
	}
	line := fmt.Sprintf("%-8s %-4d %11.2fs", label, run, first.Seconds())
	rest := fmt.Sprintf("%8.1fs %10s %10s %10s %10s %12s", at.cpu.Seconds(), mb(at.rss), mb(at.anon), mb(at.file), mb(at.heap), etcdRSS)
	var wins []placeWindow
	if *settle > 0 {
		if *windows > 0 {
			wins = placeWindows(place, req, m, *settle, *windows, t0)
		} else {
			time.Sleep(*settle)
		}
		s := memOf(cp.cmd.Process.Pid, metrics)
		rest += fmt.Sprintf("  %s/%s/%s", mb(s.rss), mb(s.anon), mb(s.heap))
	}
	// Read after the settle: a start that served early logs etcd's start and its resume later.
	ph := phases(filepath.Join(dir, "controlplane.log"), t0)
	line += fmt.Sprintf(" %8s %8s %8s %8s %9s ", ph.walked, ph.etcdUp, ph.loaded, ph.ready, ph.confirmed) + rest
	fmt.Println(line, " load", loadAvg())
	if len(wins) > 0 {
		printWindows(wins, reconcileRounds(filepath.Join(dir, "controlplane.log"), t0))
	}
	if *burst > 0 {
		burstOnce(ctx, m, etcdListen, data, place, req)
	}
}

// firstRedirect asks for probe until the control plane p answers with a redirect, and returns
// how long after t0 that was; false if p exited first.
func firstRedirect(ctx context.Context, place pb.PlacementServiceClient, probe *pb.PlaceRequest, p *proc, t0 time.Time) (time.Duration, bool) {
	for {
		if p.exited() {
			return 0, false
		}
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		resp, err := place.Place(pctx, probe)
		cancel()
		if err == nil && resp.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
			return time.Since(t0), true
		}
		if time.Since(t0) > 15*time.Minute {
			check(fmt.Errorf("no redirect within 15 minutes"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// startPhases are what a control plane's log says of its start: how long its walk of the embedded
// etcd's database file took (a start without a clean stop to serve), when its embedded etcd was up
// and its snapshot current (since the process started), and how long its load or resume took by
// its own account; "-" for what the log does not say.
type startPhases struct {
	walked, etcdUp, loaded, ready, confirmed string
}

// logLine is what startload reads of a line of the control plane's JSON log.
type logLine struct {
	Time time.Time `json:"time"`
	Msg  string    `json:"msg"`
	Took string    `json:"took"`
}

// eachLogLine calls fn for every line of the control plane's log at logPath that is JSON; a log
// that cannot be opened has none.
func eachLogLine(logPath string, fn func(logLine)) {
	f, err := os.Open(logPath)
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l logLine
		if json.Unmarshal(sc.Bytes(), &l) == nil {
			fn(l)
		}
	}
}

func phases(logPath string, t0 time.Time) startPhases {
	ph := startPhases{"-", "-", "-", "-", "-"}
	took := func(s string) string {
		if d, err := time.ParseDuration(s); err == nil {
			return fmt.Sprintf("%.2fs", d.Seconds())
		}
		return "-"
	}
	eachLogLine(logPath, func(l logLine) {
		switch {
		case strings.HasPrefix(l.Msg, "embedded etcd started"):
			ph.etcdUp = fmt.Sprintf("%.2fs", l.Time.Sub(t0).Seconds())
		case strings.HasPrefix(l.Msg, "serving the index in the embedded etcd's database file"):
			ph.walked = took(l.Took)
		case (strings.HasPrefix(l.Msg, "snapshot loaded") || strings.HasPrefix(l.Msg, "snapshot resumed from")) && ph.loaded == "-":
			ph.loaded = took(l.Took)
			ph.ready = fmt.Sprintf("%.2fs", l.Time.Sub(t0).Seconds())
		case strings.HasPrefix(l.Msg, "every target's records confirmed") && ph.confirmed == "-":
			ph.confirmed = fmt.Sprintf("%.2fs", l.Time.Sub(t0).Seconds())
		}
	})
	return ph
}

// placeWindow is Place's latency over one window, from..to since process start.
type placeWindow struct {
	from, to time.Duration
	res      loadstat.Result
}

// placeWindows calls Place on keys the index holds for d, and returns its latency window by window.
func placeWindows(place pb.PlacementServiceClient, req func(string) *pb.PlaceRequest, m *meta, d, window time.Duration, t0 time.Time) []placeWindow {
	op := func(w, i int) (int64, error) {
		_, err := place.Place(context.Background(), req(key((w*7919+i*104729)%m.Records)))
		return 0, err
	}
	var out []placeWindow
	for end := time.Now().Add(d); time.Now().Before(end); {
		from := time.Since(t0)
		res := loadstat.Run(*burstConc, window, 0, op)
		out = append(out, placeWindow{from: from, to: time.Since(t0), res: res})
	}
	return out
}

// reconcileRounds are the janitor's reconcile rounds the log tells of, from..to since t0.
func reconcileRounds(logPath string, t0 time.Time) [][2]time.Duration {
	var rounds [][2]time.Duration
	eachLogLine(logPath, func(l logLine) {
		if d, err := time.ParseDuration(l.Took); err == nil && l.Msg == "reconcile round done" {
			end := l.Time.Sub(t0)
			rounds = append(rounds, [2]time.Duration{end - d, end})
		}
	})
	return rounds
}

// printWindows prints each window's Place latency, marked R when a reconcile round overlapped it,
// and the p99s' medians of both kinds of window.
func printWindows(wins []placeWindow, rounds [][2]time.Duration) {
	var in, out []time.Duration
	for _, w := range wins {
		mark := " "
		for _, r := range rounds {
			if w.from < r[1] && r[0] < w.to {
				mark = "R"
			}
		}
		if mark == "R" {
			in = append(in, w.res.P99)
		} else {
			out = append(out, w.res.P99)
		}
		fmt.Printf("  place %6.1f–%6.1fs %s %s\n", w.from.Seconds(), w.to.Seconds(), mark, w.res)
	}
	median := func(d []time.Duration) time.Duration {
		if len(d) == 0 {
			return 0
		}
		slices.Sort(d)
		return d[len(d)/2]
	}
	fmt.Printf("  reconcile rounds %v; median window p99: %s during a round (%d windows), %s otherwise (%d)\n",
		rounds, median(in), len(in), median(out), len(out))
}

// burstOnce measures Place on keys the index holds, idle and while a writer process adds *burst
// records. Each phase is one run: its percentiles are over every call it made.
func burstOnce(ctx context.Context, m *meta, etcdURL, data string, place pb.PlacementServiceClient, req func(string) *pb.PlaceRequest) {
	op := func(w, i int) (int64, error) {
		_, err := place.Place(ctx, req(key((w*7919+i*104729)%m.Records)))
		return 0, err
	}
	idle := loadstat.Run(*burstConc, *measure, 0, op)
	self, err := os.Executable()
	check(err)
	writeBurst := func(prefix string, from int) (loadstat.Result, time.Duration, time.Time) {
		cmd := exec.Command(self, "-write-prefix", prefix, "-write-from", strconv.Itoa(from), "-etcd-url", etcdURL,
			"-write-data", data, "-dataset", *dataset, "-burst", strconv.Itoa(*burst), "-writers", strconv.Itoa(*writers),
			"-burst-rate", strconv.FormatFloat(*burstRate, 'f', -1, 64))
		var out, errOut bytes.Buffer
		stdout, err := cmd.StdoutPipe()
		check(err)
		cmd.Stderr = &errOut
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		check(cmd.Start())
		begun, done := make(chan struct{}), make(chan struct{})
		var werr error
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				if sc.Text() == "writing" {
					close(begun)
				}
				out.WriteString(sc.Text() + "\n")
			}
			werr = cmd.Wait()
			out.Write(errOut.Bytes())
			close(done)
		}()
		// Latency is measured from the writer's first write (not its start-up) until it exits.
		select {
		case <-begun:
		case <-done:
		}
		res := loadstat.RunUntil(*burstConc, done, op)
		ended := time.Now()
		if werr != nil {
			check(fmt.Errorf("the burst's writer: %v: %s", werr, out.String()))
		}
		var wrote time.Duration
		for _, line := range strings.Split(out.String(), "\n") {
			if rest, ok := strings.CutPrefix(line, "wrote in "); ok {
				wrote, err = time.ParseDuration(rest)
				check(err)
			}
		}
		if wrote == 0 {
			check(fmt.Errorf("the burst's writer did not say how long it took: %s", out.String()))
		}
		return res, wrote, ended
	}
	// The baseline: the same burst under a prefix the control plane does not watch, so etcd and
	// the writer cost the machine what they cost in the burst proper, and the control plane
	// applies nothing. What the burst proper adds to it is the control plane's own cost.
	base, baseWrote, _ := writeBurst("/startload-elsewhere/", m.Records)
	during, wrote, ended := writeBurst(targets.DefaultPrefix, m.Records)
	last := key(m.Records + *burst - 1)
	for {
		resp, err := place.Place(ctx, req(last))
		check(err)
		if resp.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	caught := time.Since(ended)
	fmt.Printf("  burst: %d records written in %s (%.0f/s, at most %g/s) by %d writers in a process of their own; Place at concurrency %d: idle %s; during the burst %s; p99 ratio %.1f; the last record placeable %s after the writer ended\n",
		*burst, wrote.Round(time.Millisecond), float64(*burst)/wrote.Seconds(), *burstRate, *writers, *burstConc, idle, during,
		float64(during.P99)/float64(idle.P99), caught.Round(time.Millisecond))
	fmt.Printf("  baseline: the same burst outside Detour's prefix, written in %s (%.0f/s): Place %s; p99 ratio to idle %.1f; the burst proper's p99 to it %.1f\n",
		baseWrote.Round(time.Millisecond), float64(*burst)/baseWrote.Seconds(), base, float64(base.P99)/float64(idle.P99),
		float64(during.P99)/float64(base.P99))
}

// writeRecords is a burst's writer (-write-prefix): *burst records in the real encoding, one per
// etcd write from *writers goroutines, for the data set's targets.
func writeRecords() {
	ctx := context.Background()
	m := loadMeta(*dataset)
	if m == nil {
		check(fmt.Errorf("-write-prefix: no data set in %s", *dataset))
	}
	cli := etcdClient(*etcdURL, *writeData)
	defer cli.Close()
	var ts []*pb.Target
	for _, name := range m.Targets {
		t, err := targets.NewRegistry(cli, "").GetTarget(ctx, name)
		check(err)
		ts = append(ts, t)
	}
	reg := targets.NewRegistry(cli, *writePrefix)
	if m.Encoding == "" {
		m.Encoding = "compact" // a data set prepared before -encoding knew home-ref
	}
	enc, err := targets.ParseRecordEncoding(m.Encoding)
	check(err)
	reg.SetRecordEncoding(enc)
	fmt.Println("writing")
	start := time.Now()
	inParallel(*writers, *burst, func(i int) {
		if *burstRate > 0 {
			time.Sleep(time.Until(start.Add(time.Duration(float64(i) / *burstRate * float64(time.Second)))))
		}
		n := *writeFrom + i
		check(reg.PutObject(ctx, record(n, ts[n%len(ts)])))
	})
	fmt.Printf("wrote in %s\n", time.Since(start))
}

type mem struct {
	rss, anon, file, heap int64
	cpu                   time.Duration // user and system time so far
}

// memOf reads a process's resident memory from /proc and, given a metrics address, its Go heap
// in use from /metrics.
func memOf(pid int, metrics string) mem {
	var m mem
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	check(err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmRSS":
			m.rss = kb << 10
		case "RssAnon":
			m.anon = kb << 10
		case "RssFile":
			m.file = kb << 10
		}
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		// Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		u, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		m.cpu = time.Duration(u+st) * time.Second / 100 // USER_HZ
	}
	if metrics != "" {
		resp, err := http.Get("http://" + metrics + "/metrics")
		check(err)
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "go_memstats_heap_inuse_bytes "); ok {
				f, _ := strconv.ParseFloat(v, 64)
				m.heap = int64(f)
			}
		}
	}
	return m
}

func mb(b int64) string { return fmt.Sprintf("%.0f MB", float64(b)/1e6) }

func waitEtcd(ctx context.Context, url, data string) {
	cli := etcdClient(url, data)
	defer cli.Close()
	deadline := time.Now().Add(10 * time.Minute)
	for {
		gctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := cli.Get(gctx, "/detour/v1/policy")
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			check(fmt.Errorf("external etcd at %s: %w", url, err))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// runEtcd serves an etcd on dir until it is signalled.
func runEtcd(dir, url string) {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	e, err := etcdembed.Start(ctx, etcdembed.Config{Dir: dir, ClientURL: url})
	check(err)
	<-ctx.Done()
	e.Close()
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	return strings.Join(f[:3], " ")
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func freeAddr() string { return fmt.Sprintf("127.0.0.1:%d", freePort()) }

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "startload:", err)
		os.Exit(1)
	}
}

var _ = io.Discard

// inParallel calls fn for 0 ≤ i < n from the given number of goroutines and returns when all are
// done.
func inParallel(goroutines, n int, fn func(i int)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
				fn(i)
			}
		}()
	}
	wg.Wait()
}
