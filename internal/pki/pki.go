// Package pki gives Detour's gRPC connections their TLS: server and client credentials read from
// PEM files and re-read when the files change (grpc-go's pemfile provider watches them), so that
// certificates rotate without a restart; the identity of an authenticated peer; and a throwaway
// development CA for zero-config runs and tests. It makes no authorization decisions.
package pki

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/tls/certprovider"
	"google.golang.org/grpc/credentials/tls/certprovider/pemfile"
	"google.golang.org/grpc/peer"
)

// Files names the PEM files of one side of a connection: its certificate chain and key (its
// identity), and the CA certificates that the peer's certificate must chain to.
type Files struct {
	Cert, Key, CA string
	// Refresh is how often the files are checked for changes (default 1m).
	Refresh time.Duration
}

func (f Files) provider() (certprovider.Provider, error) {
	for _, name := range []string{f.Cert, f.Key, f.CA} {
		if name == "" {
			continue
		}
		if _, err := os.Stat(name); err != nil {
			return nil, err
		}
	}
	if f.Refresh <= 0 {
		f.Refresh = time.Minute
	}
	return pemfile.NewProvider(pemfile.Options{CertFile: f.Cert, KeyFile: f.Key, RootFile: f.CA, RefreshDuration: f.Refresh})
}

// Credentials are transport credentials whose certificates follow their files. Close stops
// watching them.
type Credentials struct {
	prov   certprovider.Provider
	server bool
	name   string // server name override for clients
	// OnHandshakeError, if set, is told of every failed server-side handshake (a client
	// certificate from another CA, a plaintext client).
	OnHandshakeError func(error)
}

// ServerCredentials serves with Cert/Key. With CA, clients may present certificates, which must
// chain to it (a certificate from another CA fails the handshake); whether a certificate is
// required is the caller's decision per RPC (see Peer), so that health checks can go without.
func ServerCredentials(f Files) (*Credentials, error) {
	if f.Cert == "" || f.Key == "" {
		return nil, errors.New("a server certificate and key are required")
	}
	p, err := f.provider()
	if err != nil {
		return nil, err
	}
	return &Credentials{prov: p, server: true}, nil
}

// ClientCredentials verify the server against CA and, with Cert/Key, present that identity.
func ClientCredentials(f Files) (*Credentials, error) {
	if f.CA == "" {
		return nil, errors.New("a CA certificate to verify the server is required")
	}
	p, err := f.provider()
	if err != nil {
		return nil, err
	}
	return &Credentials{prov: p}, nil
}

// Close stops watching the files.
func (c *Credentials) Close() { c.prov.Close() }

// material returns the current key material, waiting at most until ctx ends for the first read.
func (c *Credentials) material(ctx context.Context) (*certprovider.KeyMaterial, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	km, err := c.prov.KeyMaterial(ctx)
	if err != nil {
		return nil, fmt.Errorf("TLS certificates not loaded: %w", err)
	}
	return km, nil
}

func (c *Credentials) current(ctx context.Context) (credentials.TransportCredentials, error) {
	km, err := c.material(ctx)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: km.Certs}
	if c.server {
		cfg.ClientCAs = km.Roots
		if km.Roots != nil {
			cfg.ClientAuth = tls.VerifyClientCertIfGiven
		}
	} else {
		cfg.RootCAs = km.Roots
		cfg.ServerName = c.name
	}
	return credentials.NewTLS(cfg), nil
}

// ClientHandshake implements credentials.TransportCredentials with the files' current contents.
func (c *Credentials) ClientHandshake(ctx context.Context, authority string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	tc, err := c.current(ctx)
	if err != nil {
		return nil, nil, err
	}
	return tc.ClientHandshake(ctx, authority, conn)
}

// ServerHandshake implements credentials.TransportCredentials with the files' current contents.
func (c *Credentials) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	tc, err := c.current(context.Background())
	if err != nil {
		return nil, nil, err
	}
	out, info, err := tc.ServerHandshake(conn)
	if err != nil && c.OnHandshakeError != nil {
		c.OnHandshakeError(err)
	}
	return out, info, err
}

// Info implements credentials.TransportCredentials.
func (c *Credentials) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls", SecurityVersion: "1.2", ServerName: c.name}
}

// Clone implements credentials.TransportCredentials.
func (c *Credentials) Clone() credentials.TransportCredentials {
	cc := *c
	return &cc
}

// OverrideServerName implements credentials.TransportCredentials.
func (c *Credentials) OverrideServerName(name string) error {
	c.name = name
	return nil
}

// Identity is the name a certificate proves: its first URI SAN (spiffe://detour/agent/a1), else
// its first DNS SAN, else its subject — the order gRPC's authorization policies match
// principals in.
func Identity(cert *x509.Certificate) string {
	switch {
	case len(cert.URIs) > 0:
		return cert.URIs[0].String()
	case len(cert.DNSNames) > 0:
		return cert.DNSNames[0]
	}
	return cert.Subject.String()
}

// Peer returns the identity of the RPC's peer if it presented a verified certificate, and
// whether the connection is TLS at all.
func Peer(ctx context.Context) (identity string, isTLS bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", false
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return "", false
	}
	if len(info.State.VerifiedChains) == 0 || len(info.State.PeerCertificates) == 0 {
		return "", true
	}
	return Identity(info.State.PeerCertificates[0]), true
}
