package etcdembed

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/detourhq/detour/internal/pki"
)

// PKI is the private certificate authority of an embedded etcd: every member serves its client
// and peer URLs with mutual TLS, and only certificates this CA issued are accepted. Its files
// live in one directory that only the owner may open, so another local user can reach the ports
// but cannot authenticate (DESIGN invariant 10: the embedded etcd is no back door).
type PKI struct {
	Dir string
	// Server is the members' certificate, for clients and peers alike (it is a client
	// certificate too, for the peer connections a member opens).
	Server pki.Files
	// Client is the certificate a client of the member presents: the control plane's, and the
	// one to give etcdctl for debugging.
	Client pki.Files
}

// PKIFiles are the files of the PKI in dir, whether or not they exist yet.
func PKIFiles(dir string) PKI {
	leaf := func(name string) pki.Files {
		return pki.Files{Cert: filepath.Join(dir, name+".pem"), Key: filepath.Join(dir, name+"-key.pem"), CA: filepath.Join(dir, "ca.pem")}
	}
	return PKI{Dir: dir, Server: leaf("server"), Client: leaf("client")}
}

// pkiMu serialises making PKIs: the members of a cluster in one process share one.
var pkiMu sync.Mutex

// loopbackHosts are always in the server certificate.
var loopbackHosts = []string{"127.0.0.1", "::1", "localhost"}

// EnsurePKI makes the PKI in dir unless it is there, and issues the server certificate again when
// it does not cover every host in hosts (a listen address changed). The directory is made, or
// narrowed, to mode 0700.
func EnsurePKI(dir string, hosts ...string) (PKI, error) {
	pkiMu.Lock()
	defer pkiMu.Unlock()
	p := PKIFiles(dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return p, fmt.Errorf("etcd PKI: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return p, fmt.Errorf("etcd PKI: %w", err)
	}
	ca, err := pki.LoadCA(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if ca, err = newCA(dir); err != nil {
			return p, fmt.Errorf("etcd PKI in %s: %w", dir, err)
		}
	case err != nil:
		return p, fmt.Errorf("etcd PKI in %s: %w", dir, err)
	}
	hosts = append(slices.Clone(loopbackHosts), hosts...)
	if !covers(p.Server.Cert, hosts) {
		if _, err := ca.WriteLeaf(dir, "server", pki.Leaf{Name: "detour-etcd", Hosts: hosts, Server: true}); err != nil {
			return p, fmt.Errorf("etcd PKI: issue server certificate: %w", err)
		}
	}
	if _, err := os.Stat(p.Client.Key); errors.Is(err, fs.ErrNotExist) {
		if _, err := ca.WriteLeaf(dir, "client", pki.Leaf{Name: "detour-etcd-client"}); err != nil {
			return p, fmt.Errorf("etcd PKI: issue client certificate: %w", err)
		}
	}
	return p, nil
}

// newCA makes the CA and writes its certificate and key into dir.
func newCA(dir string) (*pki.CA, error) {
	ca, err := pki.NewCA("Detour embedded etcd CA")
	if err != nil {
		return nil, err
	}
	kder, err := x509.MarshalECPrivateKey(ca.Key)
	if err != nil {
		return nil, err
	}
	// The key first: a CA certificate without its key would be read as a complete CA.
	if err := os.WriteFile(filepath.Join(dir, "ca-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), ca.CertPEM, 0o644); err != nil {
		return nil, err
	}
	// Certificates of an earlier CA in the directory would not chain to this one.
	for _, name := range []string{"server", "client"} {
		_ = os.Remove(filepath.Join(dir, name+".pem"))
		_ = os.Remove(filepath.Join(dir, name+"-key.pem"))
	}
	return ca, nil
}

// covers reports whether the certificate in file is valid for every host.
func covers(file string, hosts []string) bool {
	b, err := os.ReadFile(file)
	if err != nil {
		return false
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return false
	}
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return false
	}
	for _, h := range hosts {
		if cert.VerifyHostname(h) != nil {
			return false
		}
	}
	return true
}

// urlHost is the host of a listen URL, without the port ("" for a wildcard address, which a
// certificate cannot name).
func urlHost(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return ""
	}
	h := u.Hostname()
	if ip := net.ParseIP(h); ip != nil && ip.IsUnspecified() {
		return ""
	}
	return h
}
