package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// Identities of Detour's roles, as URI SANs. The default authorization policy grants by these
// prefixes; operators who issue their own certificates use the same form (or edit the policy).
const (
	AgentPrefix    = "spiffe://detour/agent/"
	OperatorPrefix = "spiffe://detour/operator/"
	ReaderPrefix   = "spiffe://detour/reader/"
	MirrorPrefix   = "spiffe://detour/mirror/"
)

// CA is a certificate authority that issues short-lived certificates: the development PKI of
// `make run` and of tests. Production deployments bring their own (cert-manager, say).
type CA struct {
	Cert    *x509.Certificate
	Key     *ecdsa.PrivateKey
	CertPEM []byte
}

// NewCA makes a fresh CA named name.
func NewCA(name string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: serial(), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(5 * 365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key, CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n
}

// Leaf describes a certificate to issue.
type Leaf struct {
	Name  string   // subject common name
	URIs  []string // identities, e.g. spiffe://detour/agent/a1
	Hosts []string // DNS names or IP addresses the holder serves as
	// Server: usable for serving TLS; else for client authentication only.
	Server bool
	TTL    time.Duration // default one year
}

// Issue signs l and returns the certificate and key in PEM.
func (ca *CA) Issue(l Leaf) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	if l.TTL <= 0 {
		l.TTL = 365 * 24 * time.Hour
	}
	tmpl := &x509.Certificate{SerialNumber: serial(), Subject: pkix.Name{CommonName: l.Name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(l.TTL),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	if l.Server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	for _, u := range l.URIs {
		pu, err := url.Parse(u)
		if err != nil {
			return nil, nil, fmt.Errorf("identity %q: %w", u, err)
		}
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	for _, h := range l.Hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, nil, err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), nil
}

// WriteLeaf issues l and writes it as dir/name.pem and dir/name-key.pem (the key readable by its
// owner only), replacing what was there; it returns the files.
func (ca *CA) WriteLeaf(dir, name string, l Leaf) (Files, error) {
	certPEM, keyPEM, err := ca.Issue(l)
	if err != nil {
		return Files{}, err
	}
	f := Files{Cert: filepath.Join(dir, name+".pem"), Key: filepath.Join(dir, name+"-key.pem"), CA: filepath.Join(dir, "ca.pem")}
	if err := writeAtomic(f.Key, keyPEM, 0o600); err != nil {
		return Files{}, err
	}
	if err := writeAtomic(f.Cert, certPEM, 0o644); err != nil {
		return Files{}, err
	}
	return f, nil
}

// writeAtomic replaces name with data through a rename, so a watcher never reads half a file.
func writeAtomic(name string, data []byte, mode os.FileMode) error {
	tmp := name + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, name)
}

// DevPKI is a development PKI in a directory: a CA, the control plane's server certificate
// (for loopback and localhost), and client certificates for an agent, an operator, a read-only
// operator and a mirror.
type DevPKI struct {
	Dir                                   string
	CA                                    Files // only CA set
	ControlPlane, Agent, Operator, Reader Files
	Mirror                                Files
}

// DevFiles are the files a DevPKI in dir has, whether or not they exist yet.
func DevFiles(dir string) DevPKI {
	leaf := func(name string) Files {
		return Files{Cert: filepath.Join(dir, name+".pem"), Key: filepath.Join(dir, name+"-key.pem"), CA: filepath.Join(dir, "ca.pem")}
	}
	return DevPKI{Dir: dir, CA: Files{CA: filepath.Join(dir, "ca.pem")}, ControlPlane: leaf("controlplane"), Agent: leaf("agent"),
		Operator: leaf("operator"), Reader: leaf("reader"), Mirror: leaf("mirror")}
}

// EnsureDev makes a development PKI in dir unless one is there, and returns its files. The CA's
// key stays in dir, so more certificates can be issued later (LoadCA).
func EnsureDev(dir string, hosts ...string) (DevPKI, bool, error) {
	p := DevFiles(dir)
	if _, err := os.Stat(p.Operator.Key); err == nil {
		return p, false, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return p, false, err
	}
	ca, err := NewCA("Detour development CA")
	if err != nil {
		return p, false, err
	}
	kder, err := x509.MarshalECPrivateKey(ca.Key)
	if err != nil {
		return p, false, err
	}
	if err := writeAtomic(filepath.Join(dir, "ca-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return p, false, err
	}
	if err := writeAtomic(p.CA.CA, ca.CertPEM, 0o644); err != nil {
		return p, false, err
	}
	hosts = append([]string{"127.0.0.1", "::1", "localhost"}, hosts...)
	leaves := []struct {
		name string
		l    Leaf
	}{
		{"controlplane", Leaf{Name: "controlplane", Hosts: hosts, Server: true}},
		{"agent", Leaf{Name: "agent", URIs: []string{AgentPrefix + "dev"}}},
		{"reader", Leaf{Name: "reader", URIs: []string{ReaderPrefix + "dev"}}},
		{"mirror", Leaf{Name: "mirror", URIs: []string{MirrorPrefix + "dev"}}},
		{"operator", Leaf{Name: "operator", URIs: []string{OperatorPrefix + "dev"}}}, // last: its key marks a complete PKI
	}
	for _, l := range leaves {
		if _, err := ca.WriteLeaf(dir, l.name, l.l); err != nil {
			return p, false, fmt.Errorf("issue %s certificate: %w", l.name, err)
		}
	}
	return p, true, nil
}

// LoadCA reads the CA a development PKI keeps in dir.
func LoadCA(dir string) (*CA, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, "ca-key.pem"))
	if err != nil {
		return nil, err
	}
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, errors.New("CA files are not PEM")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, err
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key, CertPEM: certPEM}, nil
}
