package deploy

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/prometheus/common/model"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The custom resources the manifests use, as far as they use them. Their Go types live in modules
// far heavier than these few lines (the Prometheus Operator, cert-manager), so these are subsets,
// decoded as strictly as the Kubernetes types: a field they lack is an error, either a typo or a
// field to add here after checking it against the CRD.

// checker is a decoded object that can check its own required fields.
type checker interface{ check() error }

// serviceMonitor is monitoring.coreos.com/v1 ServiceMonitor.
type serviceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		JobLabel          string               `json:"jobLabel,omitempty"`
		Selector          metav1.LabelSelector `json:"selector"`
		NamespaceSelector *struct {
			Any        bool     `json:"any,omitempty"`
			MatchNames []string `json:"matchNames,omitempty"`
		} `json:"namespaceSelector,omitempty"`
		Endpoints []struct {
			Port          string `json:"port,omitempty"`
			Path          string `json:"path,omitempty"`
			Scheme        string `json:"scheme,omitempty"`
			Interval      string `json:"interval,omitempty"`
			ScrapeTimeout string `json:"scrapeTimeout,omitempty"`
			HonorLabels   bool   `json:"honorLabels,omitempty"`
		} `json:"endpoints"`
	} `json:"spec"`
}

func (m *serviceMonitor) check() error {
	var errs []error
	if len(m.Spec.Selector.MatchLabels) == 0 && len(m.Spec.Selector.MatchExpressions) == 0 {
		errs = append(errs, errors.New("spec.selector is empty: it would select every Service"))
	}
	if len(m.Spec.Endpoints) == 0 {
		errs = append(errs, errors.New("spec.endpoints is empty"))
	}
	for i, e := range m.Spec.Endpoints {
		if e.Port == "" {
			errs = append(errs, fmt.Errorf("spec.endpoints[%d].port is required (a Service port name)", i))
		}
		for field, d := range map[string]string{"interval": e.Interval, "scrapeTimeout": e.ScrapeTimeout} {
			if _, err := model.ParseDuration(d); d != "" && err != nil {
				errs = append(errs, fmt.Errorf("spec.endpoints[%d].%s: %w", i, field, err))
			}
		}
		if e.Scheme != "" && e.Scheme != "http" && e.Scheme != "https" {
			errs = append(errs, fmt.Errorf("spec.endpoints[%d].scheme %q is not http or https", i, e.Scheme))
		}
	}
	return errors.Join(errs...)
}

// issuerRef names a cert-manager issuer.
type issuerRef struct {
	Name  string `json:"name"`
	Kind  string `json:"kind,omitempty"`
	Group string `json:"group,omitempty"`
}

// certificate is cert-manager.io/v1 Certificate.
type certificate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		SecretName     string    `json:"secretName"`
		IssuerRef      issuerRef `json:"issuerRef"`
		CommonName     string    `json:"commonName,omitempty"`
		DNSNames       []string  `json:"dnsNames,omitempty"`
		IPAddresses    []string  `json:"ipAddresses,omitempty"`
		URIs           []string  `json:"uris,omitempty"`
		EmailAddresses []string  `json:"emailAddresses,omitempty"`
		Usages         []string  `json:"usages,omitempty"`
		Duration       string    `json:"duration,omitempty"`
		RenewBefore    string    `json:"renewBefore,omitempty"`
		IsCA           bool      `json:"isCA,omitempty"`
		PrivateKey     *struct {
			Algorithm      string `json:"algorithm,omitempty"`
			Size           int    `json:"size,omitempty"`
			Encoding       string `json:"encoding,omitempty"`
			RotationPolicy string `json:"rotationPolicy,omitempty"`
		} `json:"privateKey,omitempty"`
	} `json:"spec"`
}

// certUsages are the key usages cert-manager accepts that these manifests may need.
var certUsages = []string{"signing", "digital signature", "key encipherment", "server auth", "client auth", "cert sign", "crl sign"}

func (c *certificate) check() error {
	s := c.Spec
	var errs []error
	if s.SecretName == "" {
		errs = append(errs, errors.New("spec.secretName is required"))
	}
	if s.IssuerRef.Name == "" {
		errs = append(errs, errors.New("spec.issuerRef.name is required"))
	}
	if k := s.IssuerRef.Kind; k != "" && k != "Issuer" && k != "ClusterIssuer" {
		errs = append(errs, fmt.Errorf("spec.issuerRef.kind %q is not Issuer or ClusterIssuer", k))
	}
	if s.CommonName == "" && len(s.DNSNames)+len(s.IPAddresses)+len(s.URIs)+len(s.EmailAddresses) == 0 {
		errs = append(errs, errors.New("one of spec.commonName, dnsNames, ipAddresses, uris or emailAddresses is required"))
	}
	for _, u := range s.Usages {
		if !slices.Contains(certUsages, u) {
			errs = append(errs, fmt.Errorf("spec.usages: %q is not a key usage (%q)", u, certUsages))
		}
	}
	var lifetime, renew time.Duration
	var err error
	if s.Duration != "" {
		if lifetime, err = time.ParseDuration(s.Duration); err != nil {
			errs = append(errs, fmt.Errorf("spec.duration: %w", err))
		}
	}
	if s.RenewBefore != "" {
		if renew, err = time.ParseDuration(s.RenewBefore); err != nil {
			errs = append(errs, fmt.Errorf("spec.renewBefore: %w", err))
		}
	}
	if lifetime > 0 && renew >= lifetime {
		errs = append(errs, fmt.Errorf("spec.renewBefore %s is not shorter than spec.duration %s", renew, lifetime))
	}
	if k := s.PrivateKey; k != nil {
		if !slices.Contains([]string{"", "RSA", "ECDSA", "Ed25519"}, k.Algorithm) {
			errs = append(errs, fmt.Errorf("spec.privateKey.algorithm %q is not RSA, ECDSA or Ed25519", k.Algorithm))
		}
		if !slices.Contains([]string{"", "Never", "Always"}, k.RotationPolicy) {
			errs = append(errs, fmt.Errorf("spec.privateKey.rotationPolicy %q is not Never or Always", k.RotationPolicy))
		}
	}
	return errors.Join(errs...)
}

// issuer is cert-manager.io/v1 Issuer, with the two kinds the manifests use.
type issuer struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		SelfSigned *struct{} `json:"selfSigned,omitempty"`
		CA         *struct {
			SecretName string `json:"secretName"`
		} `json:"ca,omitempty"`
	} `json:"spec"`
}

func (i *issuer) check() error {
	switch s := i.Spec; {
	case (s.SelfSigned == nil) == (s.CA == nil):
		return errors.New("spec needs exactly one of selfSigned and ca")
	case s.CA != nil && s.CA.SecretName == "":
		return errors.New("spec.ca.secretName is required")
	}
	return nil
}
