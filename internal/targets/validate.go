package targets

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Limits on what the Admin API accepts. Each is checked before the value is parsed, matched or
// written, so an oversized request costs no more than reading it; an error names the field and the
// limit.
const (
	// MaxNameLength is the longest target name or region: a DNS label.
	MaxNameLength = 63
	// MaxURIs is the most URIs a target advertises; clients try them in turn.
	MaxURIs = 16
	// MaxURILength is the longest advertised URI, in bytes.
	MaxURILength = 2048
	// MaxTLSVersions is the most TLS versions a target lists: there are four.
	MaxTLSVersions = 4
	// MinWeight and MaxWeight bound a target's share of its region's fills.
	MinWeight, MaxWeight = 1, 10000
	// MaxBucketLength is GCS's limit on a dotted bucket name.
	MaxBucketLength = 222
	// MaxPrefixLength is the longest object-name prefix in a bucket, in bytes.
	MaxPrefixLength = 512
	// MaxBaseURLLength is the longest public or CDN base URL, in bytes.
	MaxBaseURLLength = 2048
	// MaxGoogleAccessIDLength is the longest service-account name that signs URLs, in bytes.
	MaxGoogleAccessIDLength = 256
	// MaxRegionPreference is the most regions a policy ranks.
	MaxRegionPreference = 64
	// MaxCrossRegionCopyThreshold bounds the policy's cross-region redirects before a copy.
	MaxCrossRegionCopyThreshold = 1000000
	// MaxMinOccurrences bounds the policy's misses before a fill.
	MaxMinOccurrences = 255 // the admission sketch counts to 255
	// MaxMinRedirectBytes bounds the policy's min_redirect_bytes: past it hardly any response
	// would be redirected, while misses would still be filled (agents send no size hint), so a
	// larger value is a mistake that silently turns the product off.
	MaxMinRedirectBytes = 1 << 30
	// MaxKeyPrefixLength is the longest key prefix ListObjects accepts: a whole content key.
	MaxKeyPrefixLength = 64
	// DefaultPageSize is the page size of ListObjects when the request names none.
	DefaultPageSize = 100
	// MaxPageSize is the largest page ListObjects returns; a larger request is an error, not
	// silently cut, so a caller never mistakes a short page for the whole.
	MaxPageSize = 1000
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

// maxEcho bounds how much of an offending value a message quotes: enough to recognise it, never
// enough to reflect a large input back to its sender or into the logs.
const maxEcho = 64

// quote returns s quoted as %q would, cut to at most maxEcho bytes of quoted text (at a rune
// boundary), followed by the full length when it was cut. Every value a message echoes goes
// through it.
func quote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	n := 0
	for n < len(s) {
		_, size := utf8.DecodeRuneInString(s[n:])
		q := strconv.Quote(s[n : n+size])
		q = q[1 : len(q)-1]
		if b.Len()-1+len(q) > maxEcho {
			break
		}
		b.WriteString(q)
		n += size
	}
	b.WriteByte('"')
	if n < len(s) {
		fmt.Fprintf(&b, "…(%d bytes)", len(s))
	}
	return b.String()
}

// checkText checks what every string field must satisfy before anything else looks at it: at most
// max bytes, valid UTF-8, and no control characters.
func checkText(field, s string, max int) error {
	if len(s) > max {
		return invalid(field, "%s is longer than the limit of %d bytes", quote(s), max)
	}
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			return invalid(field, "is not valid UTF-8 (byte %d)", i)
		}
		if unicode.IsControl(r) {
			return invalid(field, "contains the control character %U (byte %d)", r, i)
		}
		i += size
	}
	return nil
}

var (
	labelRE  = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	bucketRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$`)
	dottedRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]*[a-z0-9]$`)
	ipRE     = regexp.MustCompile(`^\d+\.\d+\.\d+\.\d+$`)
	keyRE    = regexp.MustCompile(`^[0-9a-f]{64}$`)
	hexRE    = regexp.MustCompile(`^[0-9a-f]*$`)
)

var tlsVersions = map[string]bool{"1.0": true, "1.1": true, "1.2": true, "1.3": true}

// MaxSignedURLTTL is the longest validity a V4-signed URL may have.
const MaxSignedURLTTL = 7 * 24 * time.Hour

// ValidateName checks a target name.
func ValidateName(field, name string) error {
	if err := checkText(field, name, MaxNameLength); err != nil {
		return err
	}
	if !labelRE.MatchString(name) {
		return invalid(field, "%s is not a DNS label (1-63 of a-z, 0-9 and '-', not starting or ending with '-')", quote(name))
	}
	return nil
}

func validateRegion(field, region string) error {
	if err := checkText(field, region, MaxNameLength); err != nil {
		return err
	}
	if !labelRE.MatchString(region) {
		return invalid(field, "%s is not a region name (a DNS label of 1-63 characters)", quote(region))
	}
	return nil
}

// ValidateKey checks a content key: 64 lower-case hex digits (a SHA-256).
func ValidateKey(field, key string) error {
	if len(key) != 64 || !keyRE.MatchString(key) {
		return invalid(field, "%s is not a content key (64 lower-case hex digits)", quote(key))
	}
	return nil
}

// ValidateKeyPrefix checks the key prefix of a listing: the start of a content key, at most
// MaxKeyPrefixLength lower-case hex digits (empty lists every key).
func ValidateKeyPrefix(field, prefix string) error {
	if err := checkText(field, prefix, MaxKeyPrefixLength); err != nil {
		return err
	}
	if !hexRE.MatchString(prefix) {
		return invalid(field, "%s is not the start of a content key (lower-case hex digits)", quote(prefix))
	}
	return nil
}

// ValidatePageSize checks a requested page size and returns the one to use: DefaultPageSize for
// 0, an error for a negative size or one above MaxPageSize.
func ValidatePageSize(field string, size int32) (int, error) {
	switch {
	case size < 0:
		return 0, invalid(field, "%d is negative", size)
	case size == 0:
		return DefaultPageSize, nil
	case size > MaxPageSize:
		return 0, invalid(field, "%d is above the limit %d", size, MaxPageSize)
	}
	return int(size), nil
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
		return invalid("target.protocol", "%s is not http or https", quote(t.Protocol))
	}
	switch n := len(t.Uris); {
	case n == 0:
		return invalid("target.uris", "at least one URI is required")
	case n > MaxURIs:
		return invalid("target.uris", "has %d URIs, more than the limit of %d", n, MaxURIs)
	}
	for i, u := range t.Uris {
		if err := checkURL(fmt.Sprintf("target.uris[%d]", i), u, t.Protocol, MaxURILength); err != nil {
			return err
		}
	}
	if t.SniRequired && t.Protocol != "https" {
		return invalid("target.sni_required", "SNI needs protocol https")
	}
	if n := len(t.TlsVersions); n > MaxTLSVersions {
		return invalid("target.tls_versions", "has %d versions, more than the limit of %d", n, MaxTLSVersions)
	}
	seen := map[string]bool{}
	for i, v := range t.TlsVersions {
		if !tlsVersions[v] {
			return invalid(fmt.Sprintf("target.tls_versions[%d]", i), "%s is not one of 1.0, 1.1, 1.2, 1.3", quote(v))
		}
		if seen[v] {
			return invalid(fmt.Sprintf("target.tls_versions[%d]", i), "%s is listed twice", quote(v))
		}
		seen[v] = true
	}
	if len(t.TlsVersions) > 0 && t.Protocol != "https" {
		return invalid("target.tls_versions", "TLS versions need protocol https")
	}
	if err := validateRegion("target.region", t.Region); err != nil {
		return err
	}
	if t.Weight < MinWeight || t.Weight > MaxWeight {
		return invalid("target.weight", "%d is not between %d and %d", t.Weight, MinWeight, MaxWeight)
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

// checkURL checks an absolute http or https URL of at most max bytes, with the given scheme when
// scheme is not empty.
func checkURL(field, raw, scheme string, max int) error {
	if err := checkText(field, raw, max); err != nil {
		return err
	}
	u, err := url.Parse(raw)
	if err != nil {
		// url.Error repeats the whole input; its cause alone is enough, when it is short.
		reason := "does not parse"
		var ue *url.Error
		if errors.As(err, &ue) && len(ue.Err.Error()) <= maxEcho {
			reason = ue.Err.Error()
		}
		return invalid(field, "%s is not a URL: %s", quote(raw), reason)
	}
	if !u.IsAbs() || u.Host == "" {
		return invalid(field, "%s is not an absolute URL with a host", quote(raw))
	}
	if scheme != "" && u.Scheme != scheme {
		return invalid(field, "%s has scheme %s, the target's protocol is %s", quote(raw), quote(u.Scheme), quote(scheme))
	}
	if scheme == "" && u.Scheme != "http" && u.Scheme != "https" {
		return invalid(field, "%s is not an http or https URL", quote(raw))
	}
	if u.User != nil {
		// Not echoed: the message would carry the password into logs and to the caller.
		return invalid(field, "has credentials before the host %s: every client and reader of the target would see them", quote(u.Host))
	}
	return nil
}

// checkBaseURL checks a URL that object names are appended to: an absolute http or https URL
// without credentials, query or fragment (a name appended after either would not be a path).
func checkBaseURL(field, raw string) error {
	if err := checkURL(field, raw, "", MaxBaseURLLength); err != nil {
		return err
	}
	u, _ := url.Parse(raw) // checkURL parsed it
	switch {
	case u.RawQuery != "" || u.ForceQuery:
		return invalid(field, "%s has a query: object names are appended to the path", quote(raw))
	case u.Fragment != "" || strings.Contains(raw, "#"):
		return invalid(field, "%s has a fragment: object names are appended to the path", quote(raw))
	}
	return nil
}

// ValidateBucket checks a GCS bucket name (the rules for names without dots, and dotted names'
// components).
func ValidateBucket(field, b string) error {
	if len(b) > MaxBucketLength {
		return invalid(field, "%s is longer than the limit of %d bytes", quote(b), MaxBucketLength)
	}
	for _, part := range strings.Split(b, ".") {
		if len(part) > 63 {
			return invalid(field, "%s has a dot-separated part longer than 63 characters", quote(b))
		}
	}
	re := bucketRE
	if strings.Contains(b, ".") {
		re = dottedRE // up to 222 characters, checked per dot-separated part above
	}
	if !re.MatchString(b) {
		return invalid(field, "%s is not a bucket name (3-63 of a-z, 0-9, '-', '_', '.', starting and ending with a letter or digit)", quote(b))
	}
	if ipRE.MatchString(b) {
		return invalid(field, "%s looks like an IP address", quote(b))
	}
	if strings.HasPrefix(b, "goog") || strings.Contains(b, "google") || strings.Contains(b, "g00gle") {
		return invalid(field, "%s may not begin with goog or contain google", quote(b))
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
	if err := checkText("target.store.prefix", p, MaxPrefixLength); err != nil {
		return err
	}
	switch {
	case strings.HasPrefix(p, "/"):
		return invalid("target.store.prefix", "%s may not start with '/'", quote(p))
	case strings.ContainsAny(p, "#[]*?"):
		return invalid("target.store.prefix", "%s contains a character GCS object names should not", quote(p))
	case strings.HasPrefix(p, ".well-known/acme-challenge/"):
		return invalid("target.store.prefix", "%s is reserved by GCS", quote(p))
	}
	for _, seg := range strings.Split(p, "/") {
		if seg == "." || seg == ".." {
			return invalid("target.store.prefix", "%s has a '.' or '..' segment", quote(p))
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
		return checkBaseURL("target.url_form.public_base_url", form.PublicBaseUrl)
	case *pb.UrlForm_CdnBaseUrl:
		return checkBaseURL("target.url_form.cdn_base_url", form.CdnBaseUrl)
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
		return checkText("target.url_form.signed.google_access_id", form.Signed.GoogleAccessId, MaxGoogleAccessIDLength)
	}
	return nil
}

// ValidatePolicy checks a policy and fills defaults.
func ValidatePolicy(p *pb.Policy) error {
	if p == nil {
		return invalid("policy", "is required")
	}
	if n := len(p.RegionPreference); n > MaxRegionPreference {
		return invalid("policy.region_preference", "has %d regions, more than the limit of %d", n, MaxRegionPreference)
	}
	first := map[string]int{}
	for i, r := range p.RegionPreference {
		field := fmt.Sprintf("policy.region_preference[%d]", i)
		if err := validateRegion(field, r); err != nil {
			return err
		}
		if j, ok := first[r]; ok {
			return invalid(field, "%s is listed twice (first at [%d])", quote(r), j)
		}
		first[r] = i
	}
	if n := p.CrossRegionCopyThreshold; n > MaxCrossRegionCopyThreshold {
		return invalid("policy.cross_region_copy_threshold", "%d is more than the limit of %d", n, MaxCrossRegionCopyThreshold)
	}
	if n := p.MinRedirectBytes; n > MaxMinRedirectBytes {
		return invalid("policy.min_redirect_bytes", "%d is more than the limit of %d (1 GiB): almost nothing would be redirected", n, uint64(MaxMinRedirectBytes))
	}
	if n := p.MinOccurrences; n > MaxMinOccurrences {
		return invalid("policy.min_occurrences", "%d is more than the limit of %d", n, MaxMinOccurrences)
	}
	for _, d := range []struct {
		field    string
		v        *durationpb.Duration // nil reads as zero: the default
		min, max time.Duration
	}{
		{"policy.signed_url_ttl", p.SignedUrlTtl, time.Second, MaxSignedURLTTL},
		{"policy.fill_claim_ttl", p.FillClaimTtl, 5 * time.Second, time.Hour},
		{"policy.object_ttl", p.ObjectTtl, 0, 10 * 365 * 24 * time.Hour},
		{"policy.transient_object_ttl", p.TransientObjectTtl, time.Minute, 10 * 365 * 24 * time.Hour},
		{"policy.cross_region_copy_window", p.CrossRegionCopyWindow, time.Second, 24 * time.Hour},
		{"policy.admission_window", p.AdmissionWindow, time.Second, 24 * time.Hour},
	} {
		if d.v != nil && !d.v.IsValid() {
			return invalid(d.field, "is not a valid duration")
		}
		if x := d.v.AsDuration(); x != 0 && (x < d.min || x > d.max) {
			return invalid(d.field, "%s is not between %s and %s", x, d.min, d.max)
		}
	}
	if tr, o := p.TransientObjectTtl.AsDuration(), p.ObjectTtl.AsDuration(); tr != 0 && o != 0 && tr > o {
		return invalid("policy.transient_object_ttl", "%s is longer than policy.object_ttl (%s): transient objects would outlive the others", tr, o)
	}
	return nil
}
