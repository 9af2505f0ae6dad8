package targets

import (
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// ValidationError names the field that is wrong and why.
type ValidationError struct {
	Field string
	Msg   string
}

func (e *ValidationError) Error() string { return e.Field + ": " + e.Msg }

func invalid(field, format string, args ...any) error {
	return &ValidationError{Field: field, Msg: fmt.Sprintf(format, args...)}
}

var (
	labelRE  = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	bucketRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$`)
	dottedRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]*[a-z0-9]$`)
	ipRE     = regexp.MustCompile(`^\d+\.\d+\.\d+\.\d+$`)
	keyRE    = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

var tlsVersions = map[string]bool{"1.0": true, "1.1": true, "1.2": true, "1.3": true}

// MaxSignedURLTTL is the longest validity a V4-signed URL may have.
const MaxSignedURLTTL = 7 * 24 * time.Hour

// ValidateName checks a target name.
func ValidateName(field, name string) error {
	if !labelRE.MatchString(name) {
		return invalid(field, "%q is not a DNS label (1-63 of a-z, 0-9 and '-', not starting or ending with '-')", name)
	}
	return nil
}

// ValidateKey checks a content key: 64 lower-case hex digits (a SHA-256).
func ValidateKey(field, key string) error {
	if !keyRE.MatchString(key) {
		return invalid(field, "%q is not a content key (64 lower-case hex digits)", key)
	}
	return nil
}

// ValidateTarget checks every field of a registration and fills defaults (state ACTIVE). It
// returns the first problem found, naming the field.
func ValidateTarget(t *pb.Target) error {
	if t == nil {
		return invalid("target", "is required")
	}
	if err := ValidateName("target.name", t.Name); err != nil {
		return err
	}
	if t.Protocol != "http" && t.Protocol != "https" {
		return invalid("target.protocol", "%q is not http or https", t.Protocol)
	}
	if len(t.Uris) == 0 {
		return invalid("target.uris", "at least one URI is required")
	}
	for i, u := range t.Uris {
		if err := checkURL(fmt.Sprintf("target.uris[%d]", i), u, t.Protocol); err != nil {
			return err
		}
	}
	if t.SniRequired && t.Protocol != "https" {
		return invalid("target.sni_required", "SNI needs protocol https")
	}
	seen := map[string]bool{}
	for i, v := range t.TlsVersions {
		if !tlsVersions[v] {
			return invalid(fmt.Sprintf("target.tls_versions[%d]", i), "%q is not one of 1.0, 1.1, 1.2, 1.3", v)
		}
		if seen[v] {
			return invalid(fmt.Sprintf("target.tls_versions[%d]", i), "%q is listed twice", v)
		}
		seen[v] = true
	}
	if len(t.TlsVersions) > 0 && t.Protocol != "https" {
		return invalid("target.tls_versions", "TLS versions need protocol https")
	}
	if !labelRE.MatchString(t.Region) {
		return invalid("target.region", "%q is not a region name (a DNS label)", t.Region)
	}
	if t.Weight == 0 {
		return invalid("target.weight", "must be greater than 0")
	}
	switch t.State {
	case pb.TargetState_TARGET_STATE_UNSPECIFIED:
		t.State = pb.TargetState_TARGET_STATE_ACTIVE
	case pb.TargetState_TARGET_STATE_ACTIVE, pb.TargetState_TARGET_STATE_DRAINING, pb.TargetState_TARGET_STATE_DISABLED:
	default:
		return invalid("target.state", "%d is not ACTIVE, DRAINING or DISABLED", t.State)
	}
	if err := validateStore(t.Store); err != nil {
		return err
	}
	return validateURLForm(t.UrlForm)
}

func checkURL(field, raw, scheme string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return invalid(field, "%q does not parse: %v", raw, err)
	}
	if !u.IsAbs() || u.Host == "" {
		return invalid(field, "%q is not an absolute URL with a host", raw)
	}
	if scheme != "" && u.Scheme != scheme {
		return invalid(field, "%q has scheme %q, the target's protocol is %q", raw, u.Scheme, scheme)
	}
	if scheme == "" && u.Scheme != "http" && u.Scheme != "https" {
		return invalid(field, "%q is not an http or https URL", raw)
	}
	return nil
}

// ValidateBucket checks a GCS bucket name (the rules for names without dots, and dotted names'
// components).
func ValidateBucket(field, b string) error {
	if len(b) > 222 {
		return invalid(field, "%q is longer than 222 characters", b)
	}
	for _, part := range strings.Split(b, ".") {
		if len(part) > 63 {
			return invalid(field, "%q has a dot-separated part longer than 63 characters", b)
		}
	}
	re := bucketRE
	if strings.Contains(b, ".") {
		re = dottedRE // up to 222 characters, checked per dot-separated part above
	}
	if !re.MatchString(b) {
		return invalid(field, "%q is not a bucket name (3-63 of a-z, 0-9, '-', '_', '.', starting and ending with a letter or digit)", b)
	}
	if ipRE.MatchString(b) {
		return invalid(field, "%q looks like an IP address", b)
	}
	if strings.HasPrefix(b, "goog") || strings.Contains(b, "google") || strings.Contains(b, "g00gle") {
		return invalid(field, "%q may not begin with goog or contain google", b)
	}
	return nil
}

func validateStore(s *pb.GcsStore) error {
	if s == nil {
		return invalid("target.store", "is required (a GCS bucket)")
	}
	if err := ValidateBucket("target.store.bucket", s.Bucket); err != nil {
		return err
	}
	p := s.Prefix
	switch {
	case len(p) > 512:
		return invalid("target.store.prefix", "is longer than 512 bytes")
	case !utf8.ValidString(p):
		return invalid("target.store.prefix", "is not valid UTF-8")
	case strings.HasPrefix(p, "/"):
		return invalid("target.store.prefix", "%q may not start with '/'", p)
	case strings.ContainsAny(p, "\r\n#[]*?"):
		return invalid("target.store.prefix", "%q contains a character GCS object names should not", p)
	case strings.HasPrefix(p, ".well-known/acme-challenge/"):
		return invalid("target.store.prefix", "%q is reserved by GCS", p)
	}
	for _, seg := range strings.Split(p, "/") {
		if seg == "." || seg == ".." {
			return invalid("target.store.prefix", "%q has a '.' or '..' segment", p)
		}
	}
	return nil
}

func validateURLForm(f *pb.UrlForm) error {
	if f == nil || f.Form == nil {
		return invalid("target.url_form", "is required: public_base_url, cdn_base_url or signed")
	}
	switch form := f.Form.(type) {
	case *pb.UrlForm_PublicBaseUrl:
		return checkURL("target.url_form.public_base_url", form.PublicBaseUrl, "")
	case *pb.UrlForm_CdnBaseUrl:
		return checkURL("target.url_form.cdn_base_url", form.CdnBaseUrl, "")
	case *pb.UrlForm_Signed:
		if form.Signed == nil || form.Signed.Ttl == nil {
			return invalid("target.url_form.signed.ttl", "is required")
		}
		if err := form.Signed.Ttl.CheckValid(); err != nil {
			return invalid("target.url_form.signed.ttl", "%v", err)
		}
		ttl := form.Signed.Ttl.AsDuration()
		if ttl < time.Second || ttl > MaxSignedURLTTL {
			return invalid("target.url_form.signed.ttl", "%s is not between 1s and 7 days", ttl)
		}
	}
	return nil
}

// ValidatePolicy checks a policy and fills defaults.
func ValidatePolicy(p *pb.Policy) error {
	if p == nil {
		return invalid("policy", "is required")
	}
	for i, r := range p.RegionPreference {
		if !labelRE.MatchString(r) {
			return invalid(fmt.Sprintf("policy.region_preference[%d]", i), "%q is not a region name", r)
		}
	}
	for _, d := range []struct {
		field    string
		v        *durationpb.Duration // nil reads as zero: the default
		min, max time.Duration
	}{
		{"policy.signed_url_ttl", p.SignedUrlTtl, time.Second, MaxSignedURLTTL},
		{"policy.fill_claim_ttl", p.FillClaimTtl, 5 * time.Second, time.Hour},
		{"policy.object_ttl", p.ObjectTtl, 0, 10 * 365 * 24 * time.Hour},
	} {
		if d.v != nil && !d.v.IsValid() {
			return invalid(d.field, "is not a valid duration")
		}
		if x := d.v.AsDuration(); x != 0 && (x < d.min || x > d.max) {
			return invalid(d.field, "%s is not between %s and %s", x, d.min, d.max)
		}
	}
	return nil
}
