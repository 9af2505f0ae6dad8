// Command harness is `make bench`: every measurement next to a baseline taken in the same run on
// the same machine, written as one table into bench/RESULTS.md. HTTP answers are measured with
// wrk against nginx answering `return 302` (what a redirect costs a server that does nothing
// else), the agent and the origin; the rest with the Go load drivers beside it (placeload,
// agentload), whose own baselines are in the same run too.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/devstack"
	"github.com/detourhq/detour/internal/hgclient"
	"github.com/detourhq/detour/internal/wire"
)

var (
	dur      = flag.Duration("duration", 5*time.Second, "time per wrk measurement")
	conns    = flag.Int("connections", 16, "wrk connections")
	size     = flag.Int("size", 64<<10, "response size of the redirect and inline runs")
	requests = flag.Int("zipf-requests", 20000, "requests in each Zipf run")
	results  = flag.String("results", "bench/RESULTS.md", "file whose harness section is rewritten")
	profiles = flag.String("profile-dir", "", "if set, write CPU profiles of this process (agent, control plane, origin) during the redirect-hit and inline runs here")
)

// row is one line of the table.
type row struct{ what, result, baseline, ratio string }

func main() {
	flag.Parse()
	for _, tool := range []string{"nginx", "wrk"} {
		if _, err := exec.LookPath(tool); err != nil {
			check(fmt.Errorf("%s is not installed (make bench installs it): %w", tool, err))
		}
	}
	start := time.Now()
	ctx := context.Background()
	work, err := os.MkdirTemp("", "harness")
	check(err)
	defer os.RemoveAll(work)
	var rows []row

	// Redirect answers: nginx's 302 against the agent, with its location cache and without.
	nginx := startNginx(work)
	cached := stack(ctx, filepath.Join(work, "cached"), nil)
	uncached := stack(ctx, filepath.Join(work, "uncached"), func(c *agent.Config) { c.LocationCacheEntries = -1 })
	redirectBody, inlineBody := requestBodies(ctx, cached)
	fill(ctx, cached, 1)
	fill(ctx, uncached, 1)
	mustRedirect(ctx, cached)
	mustRedirect(ctx, uncached)
	base := wrk(work, "http://"+nginx.addr+"/", redirectBody)
	nginx.stop()
	stopProfile := profile("redirect-hit")
	hit := wrk(work, endpoint(cached.AgentURL), redirectBody)
	stopProfile()
	miss := wrk(work, endpoint(uncached.AgentURL), redirectBody)
	rows = append(rows,
		row{"redirect answer, agent location cache hit (wrk)", hit.String(), "nginx `return 302`: " + base.String(), ratio(hit.rps, base.rps)},
		row{"redirect answer, agent location cache off: a Place per request (wrk)", miss.String(), "nginx `return 302`: " + base.String(), ratio(miss.rps, base.rps)})
	uncached.Close(ctx)

	// Inline: a client without redirect support, through the agent and from the origin directly.
	org := wrk(work, endpoint(cached.OriginURL), inlineBody)
	stopProfile = profile("inline")
	inl := wrk(work, endpoint(cached.AgentURL), inlineBody)
	stopProfile()
	rows = append(rows, row{fmt.Sprintf("inline %d KiB through the agent (wrk)", *size>>10), inl.String() + ", " + inl.transfer,
		"origin direct: " + org.String() + ", " + org.transfer, ratio(inl.bytesPerSec, org.bytesPerSec)})
	cached.Close(ctx)

	// The Go drivers: inline+fill, misses, and the Zipf runs.
	out := run("agentload", "-phases", "fill", "-duration", dur.String(), "-size", strconv.Itoa(*size))
	rows = append(rows, row{fmt.Sprintf("inline+fill, every request a new key, %d KiB (agentload)", *size>>10),
		grab(out, `inline\+fill through the agent\s+(.*?)\s{2}`), "origin direct: " + grab(out, `new keys from the origin\s+(.*?)\s{2}`),
		grab(out, `ratio agent inline\+fill / origin throughput: (\S+)`)})
	out = run("placeload", "-misses", "-objects", "1000", "-duration", "3s", "-concurrency", "64")
	m := regexp.MustCompile(`(?m)^64\s+(\d+)/s.*?claims/s (\d+)\s+(\d+)/s.*?claims/s (\d+)\s+(\S+)`).FindStringSubmatch(out)
	m2 := regexp.MustCompile(`(?m)^64\s+(\d+)/s.*claims/s \d+\s+(\d+)/s.*?(\S+)$`).FindAllStringSubmatch(out, -1)
	if m != nil {
		rows = append(rows, row{"Place misses at concurrency 64, min_occurrences 1, grouped claims (placeload)",
			m[3] + "/s, " + m[4] + " claims/s", "a transaction per claim: " + m[1] + "/s, " + m[2] + " claims/s", m[5]})
	}
	if len(m2) == 2 {
		rows = append(rows, row{"Place first misses at concurrency 64, min_occurrences 2: no etcd write (placeload)",
			m2[1][1] + "/s", "empty gRPC call: " + m2[1][2] + "/s", m2[1][3]})
	}
	// Unbounded claims: the comparison is of admission alone, not of which run hits the per-agent
	// claim rate first.
	out = run("agentload", "-phases", "zipf", "-requests", strconv.Itoa(*requests), "-claim-rate", "-1")
	for _, z := range regexp.MustCompile(`min_occurrences (\d+): (\d+) objects stored\n.*\n.*: ([\d.]+)% saved; ideal ([\d.]+)%.*?([\d.]+) of the ideal`).FindAllStringSubmatch(out, -1) {
		saved, _ := strconv.ParseFloat(z[3], 64)
		rows = append(rows, row{fmt.Sprintf("Zipf(1.1), %d requests over 10 000 keys, min_occurrences %s, claims unbounded (agentload)", *requests, z[1]),
			fmt.Sprintf("%.1f %% of origin bytes saved, %s objects stored", saved, z[2]),
			fmt.Sprintf("ideal (each key's first %s requests from the origin): %s %% saved", z[1], z[4]), z[5] + " of the ideal"})
	}
	check(write(rows, time.Since(start)))
}

// profile starts a CPU profile of this process into <profile-dir>/<name>.pprof, when -profile-dir
// is set, and returns what stops it.
func profile(name string) func() {
	if *profiles == "" {
		return func() {}
	}
	check(os.MkdirAll(*profiles, 0o755))
	f, err := os.Create(filepath.Join(*profiles, name+".pprof"))
	check(err)
	check(pprof.StartCPUProfile(f))
	return func() {
		pprof.StopCPUProfile()
		check(f.Close())
	}
}

// endpoint is where a client sends manifestdata on a server at base.
func endpoint(base string) string {
	return strings.TrimSuffix(base, "/") + "/api/" + wire.APIVersion + "/ro/manifestdata"
}

func stack(ctx context.Context, dir string, cfg func(*agent.Config)) *devstack.Stack {
	s, err := devstack.Start(ctx, devstack.Options{DataDir: dir, ObjectSize: *size, PlaceTimeout: time.Second, AgentConfig: cfg,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	check(err)
	return s
}

func args(k int) map[string]any {
	return map[string]any{"nodes": []any{fmt.Sprintf("%020d", k)}, "tree": "", "size": uint64(*size)}
}

// requestBodies are the framed manifestdata request of key 1 from a client that accepts the
// stack's redirect targets, and from one that does not.
func requestBodies(ctx context.Context, s *devstack.Stack) (redirect, inline []byte) {
	hs, err := (&hgclient.Client{Base: s.AgentURL}).Capabilities(ctx)
	check(err)
	rr := &wire.RedirectRequest{Targets: hgclient.Accepted(hs.Redirect, "http", "https"), Hashes: []string{"sha256", "sha1"}}
	body := func(rr *wire.RedirectRequest) []byte {
		var buf bytes.Buffer
		w := wire.NewRequestWriter(&buf)
		check(w.WriteSettings(wire.EncodingIdentity))
		check(w.WriteCommand(&wire.CommandRequest{RequestID: 1, Name: "manifestdata", Args: args(1), Redirect: rr}))
		return buf.Bytes()
	}
	return body(rr), body(nil)
}

// fill asks for key k until it is READY.
func fill(ctx context.Context, s *devstack.Stack, k int) {
	c := &hgclient.Client{Base: s.AgentURL}
	hs, err := c.Capabilities(ctx)
	check(err)
	rr := &wire.RedirectRequest{Targets: hgclient.Accepted(hs.Redirect, "http", "https"), Hashes: []string{"sha256", "sha1"}}
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		res, err := c.CommandNoFollow(ctx, "manifestdata", args(k), rr)
		check(err)
		if res.Redirected {
			return
		}
	}
	check(fmt.Errorf("key %d not redirected within 30s", k))
}

// mustRedirect checks that what wrk will measure is a redirect answer.
func mustRedirect(ctx context.Context, s *devstack.Stack) {
	list, err := s.Admin.ListObjects(ctx, &pb.ListObjectsRequest{})
	check(err)
	if len(list.Objects) == 0 {
		check(fmt.Errorf("no READY object in %s", s.AgentURL))
	}
}

type nginxProc struct {
	addr string
	cmd  *exec.Cmd
}

// startNginx runs nginx on a free loopback port with a configuration that answers every request
// with a 302, as many workers as CPUs (the agent uses them all too).
func startNginx(work string) *nginxProc {
	dir := filepath.Join(work, "nginx")
	check(os.MkdirAll(dir, 0o755))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	addr := l.Addr().String()
	l.Close()
	conf := fmt.Sprintf(`worker_processes auto;
daemon off;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  server {
    listen %[2]s;
    location / { return 302 http://127.0.0.1:1/location; }
  }
}
`, dir, addr)
	check(os.WriteFile(filepath.Join(dir, "nginx.conf"), []byte(conf), 0o644))
	cmd := exec.Command("nginx", "-p", dir, "-c", filepath.Join(dir, "nginx.conf"))
	cmd.Stderr = os.Stderr
	check(cmd.Start())
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			check(fmt.Errorf("nginx did not listen on %s", addr))
		}
	}
	return &nginxProc{addr: addr, cmd: cmd}
}

func (n *nginxProc) stop() {
	_ = n.cmd.Process.Signal(os.Interrupt) // SIGINT: fast shutdown
	_ = n.cmd.Wait()
}

type wrkResult struct {
	rps, bytesPerSec float64
	latency, p99     string
	transfer         string
}

func (r wrkResult) String() string {
	return fmt.Sprintf("%.0f/s, mean %s, p99 %s", r.rps, r.latency, r.p99)
}

// wrk POSTs body to url for -duration over -connections connections (two threads).
func wrk(work, url string, body []byte) wrkResult {
	var lua strings.Builder
	lua.WriteString("wrk.method = \"POST\"\n")
	fmt.Fprintf(&lua, "wrk.headers[\"Content-Type\"] = %q\nwrk.headers[\"Accept\"] = %q\nwrk.body = \"", wire.MediaTypeFraming, wire.MediaTypeFraming)
	for _, b := range body {
		fmt.Fprintf(&lua, "\\%03d", b)
	}
	lua.WriteString("\"\n")
	script := filepath.Join(work, "request.lua")
	check(os.WriteFile(script, []byte(lua.String()), 0o644))
	out, err := exec.Command("wrk", "-t2", "-c"+strconv.Itoa(*conns), "-d"+dur.String(), "--latency", "-s", script, url).CombinedOutput()
	if err != nil {
		check(fmt.Errorf("wrk %s: %w\n%s", url, err, out))
	}
	s := string(out)
	if strings.Contains(s, "Non-2xx or 3xx responses") || strings.Contains(s, "Socket errors") {
		check(fmt.Errorf("wrk %s: answers that are not what is measured:\n%s", url, s))
	}
	r := wrkResult{latency: grab(s, `Latency\s+(\S+)`), p99: grab(s, `99%\s+(\S+)`), transfer: grab(s, `Transfer/sec:\s+(\S+)`) + "/s"}
	r.rps, _ = strconv.ParseFloat(grab(s, `Requests/sec:\s+(\S+)`), 64)
	r.bytesPerSec = parseSize(grab(s, `Transfer/sec:\s+(\S+)`))
	return r
}

func parseSize(s string) float64 {
	for i, unit := range []string{"GB", "MB", "KB", "B"} {
		if v, ok := strings.CutSuffix(s, unit); ok {
			f, _ := strconv.ParseFloat(v, 64)
			for range 3 - i {
				f *= 1024
			}
			return f
		}
	}
	return 0
}

// run runs a load driver of this module and returns its output.
func run(driver string, args ...string) string {
	fmt.Fprintf(os.Stderr, "harness: go run ./bench/%s %s\n", driver, strings.Join(args, " "))
	out, err := exec.Command("go", append([]string{"run", "./bench/" + driver}, args...)...).CombinedOutput()
	if err != nil {
		check(fmt.Errorf("%s: %w\n%s", driver, err, out))
	}
	fmt.Fprint(os.Stderr, string(out))
	return string(out)
}

func grab(s, re string) string {
	if m := regexp.MustCompile(re).FindStringSubmatch(s); m != nil {
		return strings.TrimSpace(m[1])
	}
	return "?"
}

func ratio(a, b float64) string {
	if b == 0 {
		return "?"
	}
	return fmt.Sprintf("%.2f", a/b)
}

// write replaces the harness section of the results file (appending it the first time).
func write(rows []row, took time.Duration) error {
	const heading = "## Harness (`make bench`)"
	var b strings.Builder
	fmt.Fprintf(&b, "%s\n\n", heading)
	fmt.Fprintf(&b, "Machine: %d CPUs (nproc), %q, Linux %s, %s; %s; the whole run took %s.\n\n", runtime.NumCPU(), cpuModel(),
		runtime.GOARCH, runtime.Version(), time.Now().UTC().Format("2006-01-02 15:04 UTC"), took.Round(time.Second))
	b.WriteString("    make bench          # go run ./bench/harness: nginx and wrk from Debian, then the Go drivers\n\n")
	fmt.Fprintf(&b, "wrk: 2 threads, %d connections, %s per measurement, the same framed `manifestdata` request every time. "+
		"Each ratio is to the baseline measured in the same run, on the same machine, just before or after. "+
		"Load driver, servers and clients share the CPUs.\n\n", *conns, *dur)
	b.WriteString("| measurement | result | baseline (same run) | ratio |\n|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", r.what, r.result, r.baseline, r.ratio)
	}
	old, err := os.ReadFile(*results)
	if err != nil {
		return err
	}
	s := string(old)
	if i := strings.Index(s, heading); i >= 0 {
		end := len(s)
		if j := strings.Index(s[i+len(heading):], "\n## "); j >= 0 {
			end = i + len(heading) + j + 1
		}
		s = s[:i] + b.String() + "\n" + s[end:]
	} else {
		s = strings.TrimRight(s, "\n") + "\n\n" + b.String()
	}
	fmt.Print(b.String())
	return os.WriteFile(*results, []byte(s), 0o644)
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	return grab(string(b), `model name\s*:\s*(.*)`)
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "harness:", err)
		os.Exit(1)
	}
}
