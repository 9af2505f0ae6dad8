package hgbundle

// What a client can apply, as far as its `clonebundles` request tells.
//
// The documentation says a client drops manifest entries it cannot use. It does not, for
// compression: bundlecaches.parsebundlespec asks util.compengines.forbundlename for the engine,
// which raises Abort ("compression engine zstd could not be loaded") when the engine is
// registered but its module is missing, and that Abort is not one of the exceptions the
// manifest filter catches; the whole clone fails. Mercurial 5.6.1 and 6.3.2 behave alike, and a
// client without the zstd C module (a pure-Python build, bin/hg here) is common. Nor does a
// client before the newest releases check a stream v2 bundle's requirements before it applies
// it (only packed1's), so a stream bundle whose store it cannot read also fails the clone.
//
// A client names the wire compressions it can decode in the X-HgProto-N headers it sends on
// every command once it has the capabilities (httppeer.makev1commandrequest), `clonebundles`
// included; "zstd" is among them exactly when it has the module.

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
)

// ClientWireCompressions returns the compressions a client offered in its X-HgProto-N headers
// ("comp=zstd,zlib,none,bzip2"), and false when it named none (an SSH or pre-3.9 client, or an
// origin whose capabilities lack `compression`).
func ClientWireCompressions(h http.Header) ([]string, bool) {
	var b strings.Builder
	for i := 1; ; i++ {
		v := h.Values(fmt.Sprintf("X-HgProto-%d", i))
		if len(v) == 0 {
			break
		}
		b.WriteString(v[0])
	}
	for _, p := range strings.Split(b.String(), " ") {
		if v, ok := strings.CutPrefix(p, "comp="); ok {
			return strings.Split(v, ","), true
		}
	}
	return nil, false
}

// ForClient returns the entries that the client whose request headers are h can apply without
// failing its clone: without zstd (or when its request does not say) it gets no zstd bundle and
// no stream bundle whose store needs zstd (revlog-compression-zstd). The order is kept.
func ForClient(entries []Entry, h http.Header) []Entry {
	comps, ok := ClientWireCompressions(h)
	zstd := ok && slices.Contains(comps, "zstd")
	out := make([]Entry, 0, len(entries))
	for _, e := range entries {
		if !zstd && needsZstd(e.BundleSpec) {
			continue
		}
		out = append(out, e)
	}
	return out
}

func needsZstd(spec string) bool {
	if strings.HasPrefix(spec, "zstd-") {
		return true
	}
	reqs, _ := StreamSpecRequirements(spec)
	return slices.Contains(reqs, "revlog-compression-zstd")
}
