package hgbundle

// The clone-bundles manifest (the answer to the v1 command `clonebundles`), as Mercurial's
// bundlecaches.parseclonebundlesmanifest reads it: UTF-8 text, one entry per line, the URL and
// then space-separated KEY=VALUE attributes. The client splits a line on whitespace, takes the
// first field as the URL as it is (no unquoting), splits every other field on its first "=" and
// URL-unquotes key and value. Upper-case keys are Mercurial's (BUNDLESPEC, REQUIRESNI,
// REQUIREDRAM); lower-case keys are free for sites.

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Entry is one line of a manifest.
type Entry struct {
	URL string
	// BundleSpec is the bundle's BUNDLESPEC as `hg debugbundle --spec` prints it (for instance
	// "zstd-v2" or a stream bundle's "none-v2;stream=v2;requirements%3Dgeneraldelta%2C…").
	// That form is already escaped and goes into the line verbatim: the client unquotes the
	// value once, which must leave "key=value" parameters after the ";" (quoting the spec once
	// more would leave "requirements%3D…", which the client's parser rejects, dropping the
	// entry). Clients drop entries whose spec they cannot apply, so an entry without one is
	// refused by Line.
	BundleSpec string
	// RequiresSNI marks a URL whose server needs TLS server name indication (an https target):
	// a client without SNI skips the entry instead of failing the clone.
	RequiresSNI bool
	// RequiredRAM, when set, is the memory the client needs to decode the bundle ("64MB");
	// clients with less than 3/2 of it skip the entry.
	RequiredRAM string
	// Attrs are further attributes, written after the reserved ones, in order.
	Attrs []Param

	// size is the stored bundle's length, for the agent's byte counts (not part of the line).
	size uint64
}

// Line encodes e as one manifest line, without the newline.
func (e Entry) Line() (string, error) {
	if e.URL == "" {
		return "", errors.New("manifest entry: empty URL")
	}
	if strings.IndexFunc(e.URL, unicode.IsSpace) >= 0 {
		return "", fmt.Errorf("manifest entry: URL %q contains white space", e.URL)
	}
	u, err := url.Parse(e.URL)
	if err != nil {
		return "", fmt.Errorf("manifest entry: URL %q: %w", e.URL, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", fmt.Errorf("manifest entry: URL %q: scheme must be http or https", e.URL)
	}
	if e.BundleSpec == "" {
		return "", fmt.Errorf("manifest entry %s: empty BUNDLESPEC", e.URL)
	}
	if strings.IndexFunc(e.BundleSpec, unicode.IsSpace) >= 0 || !utf8.ValidString(e.BundleSpec) {
		return "", fmt.Errorf("manifest entry %s: BUNDLESPEC %q is not an escaped bundle spec", e.URL, e.BundleSpec)
	}
	var attrs []Param
	if e.RequiresSNI {
		attrs = append(attrs, Param{"REQUIRESNI", "true"})
	}
	if e.RequiredRAM != "" {
		attrs = append(attrs, Param{"REQUIREDRAM", e.RequiredRAM})
	}
	attrs = append(attrs, e.Attrs...)
	var b strings.Builder
	b.WriteString(e.URL)
	b.WriteString(" BUNDLESPEC=")
	b.WriteString(e.BundleSpec)
	for _, a := range attrs {
		if a.Key == "" {
			return "", fmt.Errorf("manifest entry %s: attribute with an empty key", e.URL)
		}
		if a.Key == "URL" {
			return "", fmt.Errorf("manifest entry %s: attribute key URL is the entry's URL", e.URL)
		}
		b.WriteByte(' ')
		b.WriteString(Quote(a.Key))
		b.WriteByte('=')
		b.WriteString(Quote(a.Value))
	}
	return b.String(), nil
}

// EncodeManifest encodes entries, one line each, in order (a client with no preferences tries
// the first entry it can use). No entries make an empty manifest, which tells a client to clone
// normally.
func EncodeManifest(entries []Entry) ([]byte, error) {
	var b strings.Builder
	for i, e := range entries {
		line, err := e.Line()
		if err != nil {
			return nil, fmt.Errorf("entry %d: %w", i, err)
		}
		b.WriteString(line)
		b.WriteByte('\n')
	}
	return []byte(b.String()), nil
}

// ParseManifest reads a manifest as a client does: the URL and every attribute, unquoted, except
// BUNDLESPEC, which is kept as written (the escaped form Entry.BundleSpec holds). Entries come
// back with their reserved attributes in the fields and the rest in Attrs.
func ParseManifest(data []byte) ([]Entry, error) {
	var out []Entry
	for n, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		e := Entry{URL: fields[0]}
		for _, f := range fields[1:] {
			k, v, ok := strings.Cut(f, "=")
			if !ok {
				return nil, fmt.Errorf("manifest line %d: attribute %q has no '='", n+1, f)
			}
			key, err1 := url.PathUnescape(k)
			val, err2 := url.PathUnescape(v)
			if err := errors.Join(err1, err2); err != nil {
				return nil, fmt.Errorf("manifest line %d: attribute %q: %w", n+1, f, err)
			}
			switch key {
			case "BUNDLESPEC":
				e.BundleSpec = v
			case "REQUIRESNI":
				e.RequiresSNI = val == "true"
			case "REQUIREDRAM":
				e.RequiredRAM = val
			default:
				e.Attrs = append(e.Attrs, Param{key, val})
			}
		}
		out = append(out, e)
	}
	return out, nil
}

// Quote URL-quotes s as Python's urllib.parse.quote does by default (Mercurial's urlreq.quote):
// letters, digits, "_.-~" and "/" stay, every other byte becomes %XX.
func Quote(s string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			c == '_' || c == '.' || c == '-' || c == '~' || c == '/' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&15])
	}
	return b.String()
}
