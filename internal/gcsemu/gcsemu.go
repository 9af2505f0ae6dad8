// Package gcsemu runs a GCS-API-compatible store (fake-gcs-server) inside the process, on a
// loopback port, for `make run` and tests. Clients reach it through the real storage client.
//
// Two things GCS does that fake-gcs-server (v1.56.1) does not are added here, in front of its
// handler: object holds (fake-gcs-server neither stores nor enforces temporaryHold and
// eventBasedHold; here they are kept, returned with the object's metadata, and enforced on the JSON
// API paths the storage client uses, see holds.go), and publishing bucket change notifications to
// a Pub/Sub emulator in the process (fake-gcs-server publishes the notification configs created
// through the API, as GCS does, but only to the Pub/Sub endpoint in PUBSUB_EMULATOR_HOST; see
// pubsub.go).
package gcsemu

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsouza/fake-gcs-server/fakestorage"
)

// Server is a running emulator.
type Server struct {
	srv   *fakestorage.Server
	host  string
	http  *http.Server
	holds *holds
	meta  sync.RWMutex // see handler
}

// Options configure an emulator.
type Options struct {
	// Port to listen on at 127.0.0.1 (0: a free port).
	Port int
	// Dir, if set, keeps buckets, objects and holds on disk under it (fake-gcs-server's filesystem
	// backend), so that they outlive the process; empty: in memory. The filesystem backend keeps
	// one generation per object, and gives an object a new generation when its metadata changes.
	Dir string
}

// Start listens on 127.0.0.1:port (a free port when 0) and serves objects from memory.
func Start(port int) (*Server, error) { return StartWith(Options{Port: port}) }

// StartWith starts an emulator. The listener is opened here and kept: picking a free port and
// binding it later races every other listener and outgoing connection of the machine for it.
func StartWith(o Options) (*Server, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(o.Port))
	if err != nil {
		return nil, fmt.Errorf("start GCS emulator: %w", err)
	}
	port := lis.Addr().(*net.TCPAddr).Port
	host := "127.0.0.1:" + strconv.Itoa(port)
	fo := fakestorage.Options{
		Scheme: "http", Host: "127.0.0.1", Port: uint16(port), NoListener: true,
		ExternalURL: "http://" + host,
		// Objects are also served at http://host/<bucket>/<object>, the form of public URLs.
		PublicHost: host,
	}
	h := newHolds("")
	if o.Dir != "" {
		fo.StorageRoot = filepath.Join(o.Dir, "objects")
		if h, err = loadHolds(filepath.Join(o.Dir, "holds.json")); err != nil {
			lis.Close()
			return nil, err
		}
	}
	srv, err := fakestorage.NewServerWithOptions(fo)
	if err != nil {
		lis.Close()
		return nil, fmt.Errorf("start GCS emulator on %s: %w", host, err)
	}
	s := &Server{srv: srv, host: host, holds: h}
	s.http = &http.Server{Handler: s.handler(srv.HTTPHandler()), ReadHeaderTimeout: 10 * time.Second}
	go s.http.Serve(lis) //nolint:errcheck // ends with Stop
	return s, nil
}

// Endpoint is the JSON API endpoint for the storage client (option.WithEndpoint).
func (s *Server) Endpoint() string { return "http://" + s.host + "/storage/v1/" }

// Host is host:port.
func (s *Server) Host() string { return s.host }

// PublicURL is the base URL under which bucket's objects are served.
func (s *Server) PublicURL(bucket string) string { return "http://" + s.host + "/" + bucket + "/" }

// CreateBucket makes a bucket.
func (s *Server) CreateBucket(name string) {
	s.srv.CreateBucketWithOpts(fakestorage.CreateBucketOpts{Name: name})
}

// ObjectCount is the number of objects in bucket.
func (s *Server) ObjectCount(bucket string) (int, error) {
	objs, _, err := s.srv.ListObjectsWithOptions(bucket, fakestorage.ListOptions{})
	return len(objs), err
}

// ObjectNames lists the names of bucket's objects.
func (s *Server) ObjectNames(bucket string) ([]string, error) {
	objs, _, err := s.srv.ListObjectsWithOptions(bucket, fakestorage.ListOptions{})
	names := make([]string, len(objs))
	for i, o := range objs {
		names[i] = o.Name
	}
	return names, err
}

// Object returns an object's bytes.
func (s *Server) Object(bucket, name string) ([]byte, error) {
	o, err := s.srv.GetObject(bucket, name)
	if err != nil {
		return nil, err
	}
	return o.Content, nil
}

// Stop shuts the emulator down.
func (s *Server) Stop() {
	s.http.Close()
	s.srv.Stop()
}

// Front serves the emulator's public URLs through a switch that injects the faults a client-facing
// URL can have: an HTTP status (a bucket that is not public answers 403, a CDN misconfiguration
// 404) or no answer at all (the store unreachable). Tests and benchmarks point targets at it.
type Front struct {
	URL    string // base URL, with a trailing slash
	srv    *http.Server
	lis    net.Listener
	status atomic.Int32 // 0: pass through; -1: close the connection unanswered
}

// StartFront starts a front of s on a free loopback port.
func (s *Server) StartFront() (*Front, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	up := &url.URL{Scheme: "http", Host: s.host}
	proxy := httputil.NewSingleHostReverseProxy(up)
	f := &Front{URL: "http://" + lis.Addr().String() + "/", lis: lis}
	f.srv = &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch st := f.status.Load(); {
		case st < 0:
			if hj, ok := w.(http.Hijacker); ok {
				if c, _, err := hj.Hijack(); err == nil {
					c.Close()
					return
				}
			}
			panic(http.ErrAbortHandler)
		case st > 0:
			http.Error(w, "injected fault", int(st))
			return
		}
		r.Host = up.Host // the emulator serves public URLs by host
		proxy.ServeHTTP(w, r)
	})}
	go func() { _ = f.srv.Serve(lis) }()
	return f, nil
}

// PublicURL is the base URL under which bucket's objects are served through the front.
func (f *Front) PublicURL(bucket string) string { return f.URL + bucket + "/" }

// Fail makes every request answer with HTTP status code.
func (f *Front) Fail(code int) { f.status.Store(int32(code)) }

// Unreachable makes every request end with its connection closed and no answer.
func (f *Front) Unreachable() { f.status.Store(-1) }

// Heal passes requests through again.
func (f *Front) Heal() { f.status.Store(0) }

// Close stops the front.
func (f *Front) Close() { _ = f.srv.Close() }
