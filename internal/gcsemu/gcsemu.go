// Package gcsemu runs a GCS-API-compatible store (fake-gcs-server) inside the process, on a
// loopback port, for `make run` and tests. Clients reach it through the real storage client.
package gcsemu

import (
	"fmt"
	"net"
	"strconv"

	"github.com/fsouza/fake-gcs-server/fakestorage"
)

// Server is a running emulator.
type Server struct {
	srv  *fakestorage.Server
	host string
}

// Start listens on 127.0.0.1:port (a free port when 0) and serves objects from memory.
func Start(port int) (*Server, error) {
	if port == 0 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		port = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	host := "127.0.0.1:" + strconv.Itoa(port)
	srv, err := fakestorage.NewServerWithOptions(fakestorage.Options{
		Scheme: "http", Host: "127.0.0.1", Port: uint16(port),
		// Objects are also served at http://host/<bucket>/<object>, the form of public URLs.
		PublicHost: host,
	})
	if err != nil {
		return nil, fmt.Errorf("start GCS emulator on %s: %w", host, err)
	}
	return &Server{srv: srv, host: host}, nil
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
func (s *Server) Stop() { s.srv.Stop() }
