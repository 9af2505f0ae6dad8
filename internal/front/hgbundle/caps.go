package hgbundle

// Wire protocol v1 capabilities: the body of `?cmd=capabilities`, a space-separated list of
// names and name=value pairs, which Mercurial's server sorts (wireprotov1server.capabilities).
// Values that carry structure are URL-quoted: `bundle2=` holds the bundle2 capabilities,
// quoted lines of `key` or `key=v1,v2` (bundle2.encodecaps).

import (
	"errors"
	"fmt"
	"net/url"
	"sort"
	"strconv"
	"strings"
)

// CloneBundlesCap is the capability that makes a client (3.6 and later) ask for the manifest
// with the command of the same name before it clones.
const CloneBundlesCap = "clonebundles"

// Caps is a v1 capability list, in the order the origin sent it.
type Caps []string

// ParseCaps reads a capabilities body.
func ParseCaps(body []byte) (Caps, error) {
	s := strings.TrimSpace(string(body))
	if s == "" {
		return nil, errors.New("capabilities: empty list")
	}
	return Caps(strings.Fields(s)), nil
}

// String encodes c as the origin would.
func (c Caps) String() string { return strings.Join(c, " ") }

// Has says whether c has the capability name (with or without a value).
func (c Caps) Has(name string) bool {
	_, ok := c.Value(name)
	return ok
}

// Value returns the value of the capability name ("" for a capability without one).
func (c Caps) Value(name string) (string, bool) {
	for _, cap := range c {
		k, v, _ := strings.Cut(cap, "=")
		if k == name {
			return v, true
		}
	}
	return "", false
}

// With returns c with the capabilities names added where they are missing, sorted as
// Mercurial's server sorts the list. c is not modified.
func (c Caps) With(names ...string) Caps {
	out := append(Caps(nil), c...)
	for _, n := range names {
		if !out.Has(n) {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

// AddCloneBundles rewrites an origin's capabilities body so that clients ask for a clone-bundles
// manifest: it adds `clonebundles`, keeping the rest as the origin sent it. Only `clonebundles`
// is added, never `clonebundles_manifest`: clients from 6.5 on call `clonebundles_manifest` in
// place of `clonebundles` when it is advertised (and only then), so advertising it would oblige
// the front to answer a second command with the same manifest for no gain.
func AddCloneBundles(body []byte) ([]byte, error) {
	c, err := ParseCaps(body)
	if err != nil {
		return nil, err
	}
	return []byte(c.With(CloneBundlesCap).String()), nil
}

// HTTPHeaderLimit is the `httpheader` capability: the longest header line (name, value and
// separators) the origin reads, so the size of each X-HgArg-N header. 0 means arguments go in the
// query string (servers before Mercurial 1.9).
func (c Caps) HTTPHeaderLimit() int {
	v, ok := c.Value("httpheader")
	if !ok {
		return 0
	}
	v, _, _ = strings.Cut(v, ",")
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0
	}
	return n
}

// Bundle2 decodes the `bundle2=` capability: bundle2 capability names and their values. An
// origin without it speaks only bundle1 and cannot make the bundles this package makes.
func (c Caps) Bundle2() (Bundle2Caps, error) {
	v, ok := c.Value("bundle2")
	if !ok {
		return nil, errors.New("capabilities: no bundle2 capability (the origin speaks only bundle1)")
	}
	blob, err := url.PathUnescape(v)
	if err != nil {
		return nil, fmt.Errorf("capabilities: bundle2: %w", err)
	}
	return DecodeBundle2Caps(blob)
}

// StreamRequirements says whether the origin allows streaming clones (`stream`, or
// `streamreqs=` with the store requirements a client needs) and returns the requirements. A
// stream bundle over getbundle also needs `stream=v2` among the bundle2 capabilities.
func (c Caps) StreamRequirements() ([]string, bool) {
	if v, ok := c.Value("streamreqs"); ok {
		return strings.Split(v, ","), true
	}
	if c.Has("stream") {
		return []string{"revlogv1"}, true
	}
	return nil, false
}

// Bundle2Caps are bundle2 capabilities: name → values.
type Bundle2Caps map[string][]string

// DecodeBundle2Caps reads an unquoted bundle2 capabilities blob (bundle2.decodecaps).
func DecodeBundle2Caps(blob string) (Bundle2Caps, error) {
	out := Bundle2Caps{}
	for _, line := range strings.Split(blob, "\n") {
		if line == "" {
			continue
		}
		k, vs, hasValues := strings.Cut(line, "=")
		key, err := url.PathUnescape(k)
		if err != nil {
			return nil, fmt.Errorf("bundle2 capability %q: %w", line, err)
		}
		var values []string
		if hasValues {
			for _, v := range strings.Split(vs, ",") {
				val, err := url.PathUnescape(v)
				if err != nil {
					return nil, fmt.Errorf("bundle2 capability %q: %w", line, err)
				}
				values = append(values, val)
			}
		}
		out[key] = values
	}
	return out, nil
}

// Encode writes the capabilities as bundle2.encodecaps does: sorted names, one line each,
// `name` or `name=v1,v2`, names and values quoted.
func (b Bundle2Caps) Encode() string {
	keys := make([]string, 0, len(b))
	for k := range b {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	lines := make([]string, len(keys))
	for i, k := range keys {
		lines[i] = Quote(k)
		if vs := b[k]; len(vs) > 0 {
			q := make([]string, len(vs))
			for j, v := range vs {
				q[j] = Quote(v)
			}
			lines[i] += "=" + strings.Join(q, ",")
		}
	}
	return strings.Join(lines, "\n")
}

// Has says whether the capabilities include name with value (any value when value is "").
func (b Bundle2Caps) Has(name, value string) bool {
	vs, ok := b[name]
	if !ok || value == "" {
		return ok
	}
	for _, v := range vs {
		if v == value {
			return true
		}
	}
	return false
}
