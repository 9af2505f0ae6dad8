// Package hgserve finds a real Mercurial that speaks wire protocol version 2 (5.6.1, installed by
// `make hg` into ./bin) and runs it: `hg serve` with the v2 API on as an origin, and `hg` commands
// as a client. Tests, `make run HG_REPO=…` and benchmarks use it. It knows nothing about Detour.
package hgserve

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ErrNotFound means no Mercurial with protocol v2 is installed.
var ErrNotFound = errors.New("no Mercurial with wire protocol v2 found (run `make hg`)")

// Find returns the hg to use: $DETOUR_HG if set, else bin/hg in the module root above dir (as
// `make hg` installs it). The version is checked: releases after 5.8 have no protocol v2.
func Find(dir string) (string, error) {
	var candidates []string
	if p := os.Getenv("DETOUR_HG"); p != "" {
		candidates = append(candidates, p)
	}
	if root, err := moduleRoot(dir); err == nil {
		candidates = append(candidates, filepath.Join(root, "bin", "hg"))
	}
	for _, c := range candidates {
		if _, err := os.Stat(c); err != nil {
			continue
		}
		v, err := Version(c)
		if err != nil {
			return "", fmt.Errorf("%s: %w", c, err)
		}
		if !HasV2(v) {
			return "", fmt.Errorf("%s is Mercurial %s, which has no wire protocol v2 (4.8 to 5.8 do)", c, v)
		}
		return c, nil
	}
	return "", ErrNotFound
}

func moduleRoot(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above " + dir)
		}
		dir = parent
	}
}

// Version runs `hg --version --quiet` and returns the version, e.g. "5.6.1".
func Version(hg string) (string, error) {
	out, err := exec.Command(hg, "--version", "--quiet").Output()
	if err != nil {
		return "", fmt.Errorf("hg --version: %w", err)
	}
	s := string(out)
	i := strings.Index(s, "(version ")
	if i < 0 {
		return "", fmt.Errorf("hg --version printed %q", strings.TrimSpace(s))
	}
	s = s[i+len("(version "):]
	if j := strings.IndexByte(s, ')'); j >= 0 {
		s = s[:j]
	}
	return s, nil
}

// HasV2 reports whether Mercurial version has wire protocol v2 (4.8 to 5.8).
func HasV2(version string) bool {
	parts := strings.SplitN(version, ".", 3)
	if len(parts) < 2 {
		return false
	}
	major, err1 := strconv.Atoi(parts[0])
	minor, err2 := strconv.Atoi(parts[1])
	if err1 != nil || err2 != nil {
		return false
	}
	v := major*100 + minor
	return v >= 408 && v <= 508
}

// Env is the environment every hg run gets: no user or system configuration, plain output, a
// fixed user name.
func Env() []string {
	env := []string{}
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "HG") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "HGRCPATH=", "HGPLAIN=1", "HGUSER=detour <detour@localhost>", "HGENCODING=utf-8")
}

// ServerConfig turns on the protocol v2 API of `hg serve`.
var ServerConfig = []string{"experimental.web.apiserver=true", "experimental.web.api.http-v2=true"}

// ClientConfig makes a client speak protocol v2 to servers that offer it.
var ClientConfig = []string{"experimental.httppeer.advertise-v2=true"}

// Run runs hg with args in dir and returns its standard output; a failure includes standard error.
func Run(ctx context.Context, hg, dir string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, hg, args...)
	cmd.Dir = dir
	cmd.Env = Env()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("hg %s: %w\n%s", strings.Join(args, " "), err, tail(stderr.Bytes(), 4096))
	}
	return stdout.Bytes(), nil
}

// WithConfig prefixes args with --config for each setting.
func WithConfig(config []string, args ...string) []string {
	out := make([]string, 0, 2*len(config)+len(args))
	for _, c := range config {
		out = append(out, "--config", c)
	}
	return append(out, args...)
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// Server is a running `hg serve`.
type Server struct {
	URL       string // http://127.0.0.1:PORT/
	AccessLog string // path of the access log
	cmd       *exec.Cmd
	done      chan struct{}
	stderr    *lockedBuffer
}

// Options configure Serve.
type Options struct {
	Listen string   // host:port; default a free loopback port
	V2     bool     // turn the protocol v2 API on
	Config []string // further --config settings
	Dir    string   // where the access and error logs go (default: a temporary directory)
}

// Serve starts `hg serve` on repo and returns once it answers. It stops when ctx ends or Close is
// called.
func Serve(ctx context.Context, hg, repo string, o Options) (*Server, error) {
	if o.Listen == "" {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		o.Listen = l.Addr().String()
		l.Close()
	}
	host, port, err := net.SplitHostPort(o.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen address %q: %w", o.Listen, err)
	}
	if o.Dir == "" {
		if o.Dir, err = os.MkdirTemp("", "hgserve-"); err != nil {
			return nil, err
		}
	}
	config := append([]string(nil), o.Config...)
	if o.V2 {
		config = append(config, ServerConfig...)
	}
	s := &Server{URL: "http://" + o.Listen + "/", AccessLog: filepath.Join(o.Dir, "access.log"),
		done: make(chan struct{}), stderr: &lockedBuffer{}}
	args := WithConfig(config, "serve", "-R", repo, "--address", host, "--port", port,
		"--accesslog", s.AccessLog, "--errorlog", filepath.Join(o.Dir, "error.log"))
	s.cmd = exec.CommandContext(ctx, hg, args...)
	s.cmd.Env = Env()
	s.cmd.Stderr = s.stderr
	s.cmd.WaitDelay = 5 * time.Second
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start hg serve: %w", err)
	}
	go func() { _ = s.cmd.Wait(); close(s.done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", o.Listen, time.Second)
		if err == nil {
			c.Close()
			return s, nil
		}
		select {
		case <-s.done:
			return nil, fmt.Errorf("hg serve exited: %s", s.stderr.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Close()
			return nil, fmt.Errorf("hg serve did not listen on %s within 30s: %s", o.Listen, s.stderr.String())
		}
	}
}

// Close stops the server.
func (s *Server) Close() {
	if s.cmd.Process != nil {
		_ = s.cmd.Process.Kill()
	}
	<-s.done
}

// Requests reads the access log and counts requests by command: "capabilities" for the handshake,
// the command name for v2 commands (`POST /api/<version>/ro/<command>`), and `cmd=` for v1.
func (s *Server) Requests() (map[string]int, error) {
	f, err := os.Open(s.AccessLog)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]int{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if cmd := commandOf(sc.Text()); cmd != "" {
			out[cmd]++
		}
	}
	return out, sc.Err()
}

// commandOf extracts the command from one access-log line ("... \"POST /api/exp-http-v2-0003/ro/filesdata HTTP/1.1\" 200 -").
func commandOf(line string) string {
	i := strings.IndexByte(line, '"')
	if i < 0 {
		return ""
	}
	fields := strings.Fields(line[i+1:])
	if len(fields) < 2 {
		return ""
	}
	path := fields[1]
	if j := strings.Index(path, "/ro/"); j >= 0 && strings.Contains(path, "/api/") {
		return path[j+len("/ro/"):]
	}
	if j := strings.Index(path, "/rw/"); j >= 0 && strings.Contains(path, "/api/") {
		return path[j+len("/rw/"):]
	}
	if j := strings.Index(path, "cmd="); j >= 0 {
		c := path[j+len("cmd="):]
		if k := strings.IndexAny(c, "&;"); k >= 0 {
			c = c[:k]
		}
		return c
	}
	return ""
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.buf.Len() > 1<<20 {
		return len(p), nil
	}
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(tail(b.buf.Bytes(), 4096))
}
