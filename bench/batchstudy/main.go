// Command batchstudy measures what the recommendedbatchsize a v2 server advertises for
// manifestdata and filesdata does to clones of a growing repository, with the real Mercurial
// 5.6.1 server and client (issue 17, item 1).
//
// For each repository size it builds a repository (build.py, in one process with the system's
// Mercurial), serves it with `hg serve` (v2 API), and clones it with the 5.6.1 client through a
// proxy that rewrites the advertised batch sizes (as the agent will: wire.RewriteBatchSizes) and
// records every command: its name, its content key (the command and its canonical arguments) and
// the object bytes of its answer (decoded, what a store would hold). Then it adds 1, 10 and 100
// changesets and clones again, and counts the object bytes of manifestdata and filesdata answers
// whose keys the first clone did not have: what a cache warm before the changesets must fetch
// again. Finally each batch size's first clone pulls the 100 changesets, and its requests are
// counted.
//
//	go run ./bench/batchstudy -sizes 40,400,2000 -batches 0,16,64,256,1024
//
// Batch size 0 means the origin's own advertisement (Mercurial's defaults).
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/detourhq/detour/internal/hgserve"
	"github.com/detourhq/detour/internal/wire"
)

//go:embed build.py
var buildPy []byte

// cacheable are the commands whose answers the agent stores.
var cacheable = map[string]bool{"manifestdata": true, "filesdata": true}

type record struct {
	command string
	key     string
	objects int64 // decoded object bytes
	wire    int64 // response body bytes
}

// proxy forwards to the origin, rewrites the handshake's batch sizes, and records commands.
type proxy struct {
	rp    *httputil.ReverseProxy
	batch atomic.Uint64
	mu    sync.Mutex
	recs  []record
	http  int
}

func (p *proxy) take() ([]record, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	r, n := p.recs, p.http
	p.recs, p.http = nil, 0
	return r, n
}

func (p *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.mu.Lock()
	p.http++
	p.mu.Unlock()
	if r.Method != http.MethodPost {
		p.rp.ServeHTTP(w, r)
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	rec := &recorder{header: http.Header{}}
	p.rp.ServeHTTP(rec, r)
	for k, v := range rec.header {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.status)
	w.Write(rec.body.Bytes())

	rs, err := wire.ReadRequest(bytes.NewReader(body), wire.ReaderOptions{MaxTotal: -1})
	if err != nil || len(rs.Commands) != 1 {
		return
	}
	cmd := rs.Commands[0]
	canon, err := wire.Canonical(cmd.Args)
	if err != nil {
		log.Fatalf("%s: canonical args: %v", cmd.Name, err)
	}
	sum := sha256.Sum256(append([]byte(cmd.Name+"\x00"), canon...))
	var objects int64
	if resp, err := wire.ReadResponse(bytes.NewReader(rec.body.Bytes()), cmd.RequestID, wire.ReaderOptions{MaxPayload: wire.MaxPayloadLimit}); err == nil {
		objects, _ = io.Copy(io.Discard, resp)
	}
	p.mu.Lock()
	p.recs = append(p.recs, record{command: cmd.Name, key: hex.EncodeToString(sum[:]), objects: objects, wire: int64(rec.body.Len())})
	p.mu.Unlock()
}

type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) WriteHeader(s int)           { r.status = s }
func (r *recorder) Write(b []byte) (int, error) { return r.body.Write(b) }

func newProxy(origin string) *proxy {
	u, _ := url.Parse(origin)
	p := &proxy{}
	p.rp = httputil.NewSingleHostReverseProxy(u)
	p.rp.ModifyResponse = func(resp *http.Response) error {
		if resp.Request.Method != http.MethodGet || resp.Header.Get("Content-Type") != wire.MediaTypeCBOR || p.batch.Load() == 0 {
			return nil
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		sizes := map[string]uint64{"manifestdata": p.batch.Load(), "filesdata": p.batch.Load()}
		out, err := wire.RewriteHandshakeV2(b, func(v2 []byte) ([]byte, error) { return wire.RewriteBatchSizes(v2, sizes) })
		if err != nil {
			return err
		}
		resp.Body = io.NopCloser(bytes.NewReader(out))
		resp.ContentLength = int64(len(out))
		resp.Header.Set("Content-Length", strconv.Itoa(len(out)))
		return nil
	}
	return p
}

type clone struct {
	requests int              // command requests (POST)
	http     int              // all HTTP requests
	byCmd    map[string]int   // command requests by name
	keys     map[string]int64 // cacheable key -> object bytes
	objects  int64            // cacheable object bytes
	wire     int64            // response bytes of all commands
	seconds  float64
}

func summarize(recs []record, httpN int, d time.Duration) clone {
	c := clone{http: httpN, byCmd: map[string]int{}, keys: map[string]int64{}, seconds: d.Seconds()}
	for _, r := range recs {
		c.requests++
		c.byCmd[r.command]++
		c.wire += r.wire
		if cacheable[r.command] {
			c.keys[r.key] = r.objects
			c.objects += r.objects
		}
	}
	return c
}

// refetched is the cacheable object bytes (and requests) of c whose keys warm lacks.
func refetched(c, warm clone) (bytes int64, requests int) {
	for k, n := range c.keys {
		if _, ok := warm.keys[k]; !ok {
			bytes += n
			requests++
		}
	}
	return bytes, requests
}

func main() {
	sizesFlag := flag.String("sizes", "40,400,2000", "repository sizes (changesets)")
	batchesFlag := flag.String("batches", "0,16,64,256,1024", "advertised batch sizes (0: the origin's own)")
	growthFlag := flag.String("growth", "1,10,100", "new changesets after the warm clone (cumulative states)")
	files := flag.Int("files", 300, "files in the first changeset")
	work := flag.String("work", "", "working directory (default: a temporary one, removed)")
	flag.Parse()
	sizes, batches, growth := ints(*sizesFlag), ints(*batchesFlag), ints(*growthFlag)

	ctx := context.Background()
	hg, err := hgserve.Find(".")
	if err != nil {
		log.Fatal(err)
	}
	dir := *work
	if dir == "" {
		if dir, err = os.MkdirTemp("", "batchstudy-"); err != nil {
			log.Fatal(err)
		}
		defer os.RemoveAll(dir)
	}
	if err := os.MkdirAll(filepath.Join(dir, "logs"), 0o755); err != nil {
		log.Fatal(err)
	}
	script := filepath.Join(dir, "build.py")
	if err := os.WriteFile(script, buildPy, 0o644); err != nil {
		log.Fatal(err)
	}

	fmt.Printf("| changesets | batch | clone requests (manifestdata+filesdata) | clone object bytes | origin bytes (zlib) | clone s | re-fetched after +%s (bytes, %% of clone, requests) | pull +%d requests |\n",
		strings.Join(strs(growth), " / +"), growth[len(growth)-1])
	fmt.Println("|---|---|---|---|---|---|---|---|")
	for _, n := range sizes {
		repo := filepath.Join(dir, fmt.Sprintf("repo-%d", n))
		if _, err := hgserve.Run(ctx, hg, dir, "init", repo); err != nil {
			log.Fatal(err)
		}
		grow(repo, script, n, 1, *files)
		results := map[int][]clone{} // batch -> clone per state (0 = warm)
		warmDirs := map[int]string{}
		states := append([]int{0}, growth...)
		for si, g := range states {
			if si > 0 {
				grow(repo, script, g-states[si-1], int64(si+1), *files)
			}
			srv, err := hgserve.Serve(ctx, hg, repo, hgserve.Options{V2: true, Dir: filepath.Join(dir, "logs")})
			if err != nil {
				log.Fatal(err)
			}
			p := newProxy(srv.URL)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				log.Fatal(err)
			}
			hs := &http.Server{Handler: p}
			go hs.Serve(ln)
			url := "http://" + ln.Addr().String() + "/"
			for _, b := range batches {
				p.batch.Store(uint64(b))
				dest := filepath.Join(dir, fmt.Sprintf("clone-%d-%d-%d", n, b, g))
				start := time.Now()
				if _, err := hgserve.Run(ctx, hg, dir, hgserve.WithConfig(hgserve.ClientConfig, "clone", "-U", url, dest)...); err != nil {
					log.Fatal(err)
				}
				recs, httpN := p.take()
				results[b] = append(results[b], summarize(recs, httpN, time.Since(start)))
				if si == 0 {
					warmDirs[b] = dest
				} else {
					os.RemoveAll(dest)
				}
				if si == len(states)-1 {
					// The warm clone pulls all the new changesets.
					if _, err := hgserve.Run(ctx, hg, warmDirs[b], hgserve.WithConfig(hgserve.ClientConfig, "pull", url)...); err != nil {
						log.Fatal(err)
					}
					recs, httpN := p.take()
					pc := summarize(recs, httpN, 0)
					results[b] = append(results[b], pc)
					os.RemoveAll(warmDirs[b])
				}
			}
			hs.Close()
			srv.Close()
		}
		for _, b := range batches {
			rs := results[b]
			warm := rs[0]
			var cells []string
			for i := range growth {
				by, req := refetched(rs[i+1], warm)
				cells = append(cells, fmt.Sprintf("%s, %.1f%%, %d", kb(by), 100*float64(by)/float64(rs[i+1].objects), req))
			}
			pull := rs[len(rs)-1]
			label := strconv.Itoa(b)
			if b == 0 {
				label = "origin's (50000/100000)"
			}
			fmt.Printf("| %d | %s | %d (%d+%d) | %s | %s | %.1f | %s | %d (%d+%d) |\n", n, label, warm.requests,
				warm.byCmd["manifestdata"], warm.byCmd["filesdata"], kb(warm.objects), kb(warm.wire), warm.seconds,
				strings.Join(cells, " / "), pull.requests, pull.byCmd["manifestdata"], pull.byCmd["filesdata"])
		}
	}
}

// grow adds count changesets to repo with build.py under the system's Mercurial (it has its C
// extensions: thousands of changesets take seconds, where 5.6.1's pure Python takes minutes).
func grow(repo, script string, count int, seed int64, files int) {
	if count <= 0 {
		return
	}
	cmd := exec.Command("/usr/bin/python3", script, repo, strconv.Itoa(count), strconv.FormatInt(seed, 10), strconv.Itoa(files))
	cmd.Env = hgserve.Env()
	if out, err := cmd.CombinedOutput(); err != nil {
		log.Fatalf("build.py (needs Debian's mercurial at /usr/bin/hg): %v\n%s", err, out)
	}
}

func ints(s string) []int {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			log.Fatalf("%q: %v", s, err)
		}
		out = append(out, n)
	}
	return out
}

func strs(v []int) []string {
	var out []string
	for _, n := range v {
		out = append(out, strconv.Itoa(n))
	}
	return out
}

func kb(n int64) string {
	switch {
	case n >= 10<<20:
		return fmt.Sprintf("%.1f MB", float64(n)/1e6)
	case n >= 10<<10:
		return fmt.Sprintf("%.0f KB", float64(n)/1e3)
	}
	return fmt.Sprintf("%d B", n)
}
