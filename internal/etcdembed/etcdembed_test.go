package etcdembed

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/detourhq/detour/internal/pki"
)

// TestStartPicksOtherPortsWhenOneIsTaken: a port picked by Start and taken by someone else before
// etcd binds it is not a failed start. The test takes every port FreeURL hands out first, once.
func TestStartPicksOtherPortsWhenOneIsTaken(t *testing.T) {
	taken := 0
	freeURL = func() (string, error) {
		u, err := freeLoopbackURL()
		if err != nil || taken > 0 {
			return u, err
		}
		taken++
		l, err := net.Listen("tcp", strings.TrimPrefix(u, "https://"))
		if err != nil {
			return "", err
		}
		t.Cleanup(func() { l.Close() })
		return u, nil
	}
	t.Cleanup(func() { freeURL = freeLoopbackURL })
	s, err := Start(context.Background(), Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if taken != 1 {
		t.Fatalf("the test took %d ports, want 1", taken)
	}
}

// The member serves its client and peer URLs with mutual TLS only: a plaintext client, a TLS
// client without a certificate, and one with a certificate of another CA are refused; the
// member's own client certificate works. The PKI is readable by its owner only.
func TestPlaintextAndForeignClientsAreRefused(t *testing.T) {
	s, err := Start(context.Background(), Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()

	good, err := clientv3.New(s.ClientConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	if _, err := good.Put(ctx, "k", "v"); err != nil {
		t.Fatalf("the member's own client certificate: %v", err)
	}

	caPool := x509.NewCertPool()
	caPEM, err := os.ReadFile(s.PKI().Client.CA)
	if err != nil {
		t.Fatal(err)
	}
	caPool.AppendCertsFromPEM(caPEM)
	other, err := pki.NewCA("another CA")
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := other.Issue(pki.Leaf{Name: "detour-etcd-client"})
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	host := strings.TrimPrefix(s.Endpoint(), "https://")
	for _, c := range []struct {
		name string
		cfg  clientv3.Config
	}{
		{"plaintext", clientv3.Config{Endpoints: []string{"http://" + host}}},
		{"TLS without a client certificate", clientv3.Config{Endpoints: []string{s.Endpoint()}, TLS: &tls.Config{RootCAs: caPool}}},
		{"a certificate of another CA", clientv3.Config{Endpoints: []string{s.Endpoint()},
			TLS: &tls.Config{RootCAs: caPool, Certificates: []tls.Certificate{foreign}}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.cfg.DialTimeout = time.Second
			cli, err := clientv3.New(c.cfg)
			if err != nil {
				return // refused at dial
			}
			defer cli.Close()
			rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			if resp, err := cli.Get(rctx, "k"); err == nil {
				t.Fatalf("read %d keys", len(resp.Kvs))
			}
		})
	}

	// Neither URL answers plain HTTP (etcd serves /health and /version on both).
	for _, u := range []string{s.Config().ClientURL, s.Config().PeerURL} {
		plain := "http://" + strings.TrimPrefix(u, "https://")
		resp, err := (&http.Client{Timeout: 2 * time.Second}).Get(plain + "/version")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				t.Errorf("%s answered plain HTTP: %s", plain, body)
			}
		}
		// TLS without a client certificate: the handshake or the request fails.
		tc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: caPool}}}
		if resp, err := tc.Get(u + "/version"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				t.Errorf("%s answered TLS without a client certificate", u)
			}
		}
	}

	for _, f := range []string{s.PKI().Dir, s.PKI().Client.Key, s.PKI().Server.Key} {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s has mode %v: others may read it", f, fi.Mode().Perm())
		}
	}
}

// A member restarted on its data keeps its PKI, and a client URL that is not https is refused
// with the field named.
func TestRestartKeepsThePKIAndPlaintextURLsAreRefused(t *testing.T) {
	s, err := Start(context.Background(), Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	cfg := s.Config()
	ca, err := os.ReadFile(s.PKI().Client.CA)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	again, err := os.ReadFile(s.PKI().Client.CA)
	if err != nil {
		t.Fatal(err)
	}
	if string(again) != string(ca) {
		t.Fatal("a restart made a new CA: clients holding the old certificates are locked out")
	}
	cli, err := clientv3.New(s.ClientConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if _, err := cli.Get(context.Background(), "k"); err != nil {
		t.Fatal(err)
	}

	_, err = Start(context.Background(), Config{Dir: t.TempDir(), ClientURL: "http://127.0.0.1:0"})
	if err == nil || !strings.Contains(err.Error(), "client URL") || !strings.Contains(err.Error(), "https://") {
		t.Fatalf("a plaintext client URL: %v", err)
	}
}

// A client URL on port 0 (any free port) gives clients a real port, also through the member
// list that clients sync their endpoints from (every minute in the control plane): a control plane
// started with --embedded-etcd-listen https://127.0.0.1:0 once dialled :0 and waited for ever.
func TestPortZeroGivesTheBoundPort(t *testing.T) {
	s, err := Start(context.Background(), Config{Dir: t.TempDir(), ClientURL: "https://127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if strings.HasSuffix(s.Endpoint(), ":0") {
		t.Fatalf("endpoint %s", s.Endpoint())
	}
	cli, err := clientv3.New(s.ClientConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, "k", "v"); err != nil {
		t.Fatalf("put through %s: %v", s.Endpoint(), err)
	}
	if err := cli.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	for _, e := range cli.Endpoints() {
		if strings.HasSuffix(e, ":0") {
			t.Fatalf("after a sync the client's endpoints are %v", cli.Endpoints())
		}
	}
	if _, err := cli.Put(ctx, "k", "v2"); err != nil {
		t.Fatalf("put after a sync to %v: %v", cli.Endpoints(), err)
	}
}
