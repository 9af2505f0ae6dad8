// Package testbed runs Detour's own binaries as real processes on loopback, for end-to-end and
// chaos tests: it builds cmd/controlplane and cmd/agent once per test binary, starts them on free
// ports with their logs kept for failure reports, and stops, kills, freezes or resumes them. It
// holds no Detour logic of its own.
package testbed

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/detourhq/detour/internal/pki"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error

	pkiOnce sync.Once
	pkiDev  pki.DevPKI
	pkiErr  error
)

// PKI is a development PKI shared by the test binary's tests (made once, in a directory that
// lives as long as the binary): the control plane serves with its certificate, agents and
// operators connect with theirs, so tests run with mutual TLS on.
func PKI(t testing.TB) pki.DevPKI {
	t.Helper()
	pkiOnce.Do(func() {
		dir, err := os.MkdirTemp("", "detour-testpki-")
		if err != nil {
			pkiErr = err
			return
		}
		pkiDev, _, pkiErr = pki.EnsureDev(dir)
	})
	if pkiErr != nil {
		t.Fatal(pkiErr)
	}
	return pkiDev
}

// Dial connects to a control plane at addr with the identity in files (mutual TLS), closing the
// connection when the test ends.
func Dial(t testing.TB, addr string, files pki.Files) *grpc.ClientConn {
	t.Helper()
	creds, err := pki.ClientCredentials(files)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); creds.Close() })
	return conn
}

// Binaries builds the control plane, agent and detourctl into a directory that lives as long as
// the test binary, once, and returns it.
func Binaries(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		root, err := moduleRoot()
		if err != nil {
			buildErr = err
			return
		}
		buildDir, err = os.MkdirTemp("", "detour-testbed-")
		if err != nil {
			buildErr = err
			return
		}
		cmd := exec.Command("go", "build", "-o", buildDir, "./cmd/controlplane", "./cmd/agent", "./cmd/detourctl")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %w\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildDir
}

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("not inside the module")
	}
	return filepath.Dir(mod), nil
}

// FreeAddr returns a loopback address with a port that was free a moment ago, for a process that
// binds it later. The port is drawn below Linux's default ephemeral range (32768–60999), which
// outgoing connections and port-0 listeners take theirs from, so only another explicit bind can
// take it in between.
func FreeAddr(t testing.TB) string {
	t.Helper()
	for range 100 {
		port := 20000 + rand.IntN(12000)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		addr := l.Addr().String()
		l.Close()
		return addr
	}
	t.Fatal("no free loopback port found in 20000-31999")
	return ""
}

// Proc is one running binary.
type Proc struct {
	Name string
	Args []string
	bin  string
	t    testing.TB
	log  *Buffer
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// Start runs bin with args. Its output is kept and printed if the test fails; it is killed at the
// end of the test if still running.
func Start(t testing.TB, name, bin string, args ...string) *Proc {
	t.Helper()
	p := &Proc{Name: name, Args: args, bin: bin, t: t, log: &Buffer{}}
	p.start()
	t.Cleanup(func() {
		p.Kill()
		if t.Failed() {
			t.Logf("--- %s output (last 16 KiB) ---\n%s", p.Name, p.log.Tail(16<<10))
		}
	})
	return p
}

func (p *Proc) start() {
	p.cmd = exec.Command(p.bin, p.Args...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	p.done = make(chan struct{})
	if err := p.cmd.Start(); err != nil {
		p.t.Fatalf("start %s: %v", p.Name, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
}

// Restart starts the process again with the same arguments after it has exited.
func (p *Proc) Restart() {
	p.t.Helper()
	select {
	case <-p.done:
	default:
		p.t.Fatalf("restart %s: still running", p.Name)
	}
	p.start()
}

// Running reports whether the process has not exited.
func (p *Proc) Running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Stop sends SIGTERM and waits for the exit (SIGKILL after timeout).
func (p *Proc) Stop(timeout time.Duration) error {
	if !p.Running() {
		return p.err
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		p.Kill()
		return fmt.Errorf("%s did not stop within %s", p.Name, timeout)
	}
}

// Kill sends SIGKILL and waits for the exit.
func (p *Proc) Kill() {
	if p.Running() {
		_ = p.cmd.Process.Signal(syscall.SIGCONT)
		_ = p.cmd.Process.Kill()
	}
	<-p.done
}

// Freeze stops the process with SIGSTOP; Thaw resumes it.
func (p *Proc) Freeze() { _ = p.cmd.Process.Signal(syscall.SIGSTOP) }

// Thaw resumes a frozen process.
func (p *Proc) Thaw() { _ = p.cmd.Process.Signal(syscall.SIGCONT) }

// PID is the process id of the current run (changes on Restart).
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Output is everything the process printed so far.
func (p *Proc) Output() string { return p.log.String() }

// ControlPlane is a running cmd/controlplane on an embedded etcd.
type ControlPlane struct {
	*Proc
	Addr        string // gRPC
	MetricsAddr string
	DataDir     string
}

// StartControlPlane starts a control plane with an embedded etcd in a fresh directory and waits
// until its gRPC health service reports SERVING. extra flags are appended.
func StartControlPlane(t testing.TB, extra ...string) *ControlPlane {
	t.Helper()
	bin := filepath.Join(Binaries(t), "controlplane")
	cp := &ControlPlane{Addr: FreeAddr(t), MetricsAddr: FreeAddr(t), DataDir: t.TempDir()}
	args := append([]string{"--listen", cp.Addr, "--metrics-listen", cp.MetricsAddr, "--data-dir", cp.DataDir,
		"--dev-pki", PKI(t).Dir, "--log-level", "debug"}, extra...)
	cp.Proc = Start(t, "controlplane", bin, args...)
	cp.WaitServing(t, 60*time.Second)
	return cp
}

// WaitServing waits until the gRPC health service answers SERVING.
func (cp *ControlPlane) WaitServing(t testing.TB, within time.Duration) {
	t.Helper()
	creds, err := pki.ClientCredentials(PKI(t).CA) // health checks need no client certificate
	if err != nil {
		t.Fatal(err)
	}
	defer creds.Close()
	conn, err := grpc.NewClient(cp.Addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	deadline := time.Now().Add(within)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil && resp.Status == healthpb.HealthCheckResponse_SERVING {
			return
		}
		if !cp.Running() {
			t.Fatalf("control plane exited: %v\n%s", cp.err, cp.log.Tail(8<<10))
		}
		if time.Now().After(deadline) {
			t.Fatalf("control plane not serving within %s: %v", within, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Agent is a running cmd/agent.
type Agent struct {
	*Proc
	URL        string // what clients use
	MetricsURL string // .../metrics
}

// StartAgent starts an agent in front of origin and waits until it answers HTTP. It connects
// with the test PKI's agent certificate; extra flags are appended (--controlplane, --region,
// --gcs-endpoint …).
func StartAgent(t testing.TB, origin string, extra ...string) *Agent {
	t.Helper()
	bin := filepath.Join(Binaries(t), "agent")
	addr, maddr := FreeAddr(t), FreeAddr(t)
	a := &Agent{URL: "http://" + addr + "/", MetricsURL: "http://" + maddr + "/metrics"}
	ag := PKI(t).Agent
	args := append([]string{"--listen", addr, "--metrics-listen", maddr, "--origin", origin, "--log-level", "debug",
		"--tls-ca", ag.CA, "--tls-cert", ag.Cert, "--tls-key", ag.Key}, extra...)
	a.Proc = Start(t, "agent", bin, args...)
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(a.MetricsURL)
		if err == nil {
			resp.Body.Close()
			return a
		}
		if !a.Running() {
			t.Fatalf("agent exited: %v\n%s", a.err, a.log.Tail(8<<10))
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent not answering within 30s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Metric returns the sum of the samples of a counter or gauge whose line starts with name and
// contains every one of labels (e.g. `outcome="redirect"`), from a Prometheus text endpoint.
func Metric(t testing.TB, url, name string, labels ...string) float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("metrics %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, line := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(line, name) || (len(line) > len(name) && line[len(name)] != '{' && line[len(name)] != ' ') {
			continue
		}
		ok := true
		for _, l := range labels {
			ok = ok && strings.Contains(line, l)
		}
		if !ok {
			continue
		}
		var v float64
		if _, err := fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v); err == nil {
			sum += v
		}
	}
	return sum
}

// Eventually polls cond every 20ms until it holds, failing the test after within.
func Eventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", within, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Buffer is a bytes.Buffer safe for concurrent writers, such as a logger's output read by a test.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *Buffer) Tail(n int) string {
	s := b.String()
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// Log is a logger for an in-process stack (debug and up) whose output is kept and printed, its
// last 64 KB, only if the test fails: a stack that logs to io.Discard leaves a CI failure without
// its cause.
func Log(t testing.TB) *slog.Logger {
	var b Buffer
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the stack's log (last 64 KB):\n%s", b.Tail(64<<10))
		}
	})
	return slog.New(slog.NewTextHandler(&b, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
