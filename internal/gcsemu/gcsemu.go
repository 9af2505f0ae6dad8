// Package gcsemu runs a GCS-API-compatible store (fake-gcs-server) inside the process, on a
// loopback port, for `make run` and tests. Clients reach it through the real storage client.
package gcsemu

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/fsouza/fake-gcs-server/fakestorage"
)

// Server is a running emulator.
type Server struct {
	srv  *fakestorage.Server
	host string
	http *http.Server // serving srv on a listener of ours (port 0), else nil
}

// Start listens on 127.0.0.1:port (a free port when 0) and serves objects from memory. With port
// 0 the listener is opened here and kept: picking a free port and binding it later races every
// other listener and outgoing connection of the machine for it.
func Start(port int) (*Server, error) {
	var lis net.Listener
	if port == 0 {
		var err error
		if lis, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			return nil, err
		}
		port = lis.Addr().(*net.TCPAddr).Port
	}
	host := "127.0.0.1:" + strconv.Itoa(port)
	srv, err := fakestorage.NewServerWithOptions(fakestorage.Options{
		Scheme: "http", Host: "127.0.0.1", Port: uint16(port), NoListener: lis != nil,
		ExternalURL: "http://" + host,
		// Objects are also served at http://host/<bucket>/<object>, the form of public URLs.
		PublicHost: host,
	})
	if err != nil {
		if lis != nil {
			lis.Close()
		}
		return nil, fmt.Errorf("start GCS emulator on %s: %w", host, err)
	}
	s := &Server{srv: srv, host: host}
	if lis != nil {
		s.http = &http.Server{Handler: srv.HTTPHandler(), ReadHeaderTimeout: 10 * time.Second}
		go s.http.Serve(lis) //nolint:errcheck // ends with Stop
	}
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
	if s.http != nil {
		s.http.Close()
	}
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
