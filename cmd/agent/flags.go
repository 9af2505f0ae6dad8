package main

import (
	"fmt"
	"strings"

	"github.com/detourhq/detour/internal/flagcheck"
	"github.com/detourhq/detour/internal/front/hgbundle"
)

// maxBundleStep bounds --bundle-step: a step past a repository's number of changesets gives it no
// checkpoint, and so no clone bundle, at all; 2^20 is above the largest public repositories' counts
// (the default, StepFor, never exceeds 65536).
const maxBundleStep = 1 << 20

// checkBundleFlags refuses, naming the flag, a --bundle-step that is negative or past
// maxBundleStep and a --bundle-formats entry that is not one of zstd, gzip, none or is given
// twice, and returns the formats in order. It is checked whether or not the hgbundle front is
// enabled, so that enabling it later cannot reveal a bad value.
func checkBundleFlags(step int, formats string) ([]hgbundle.Compression, error) {
	errs := []error{flagcheck.Int("bundle-step", int64(step), 0, maxBundleStep, false)}
	var comps []hgbundle.Compression
	seen := make(map[hgbundle.Compression]bool)
	for _, s := range strings.Split(formats, ",") {
		s = strings.TrimSpace(s)
		c, err := hgbundle.ParseCompression(s)
		switch {
		case err != nil:
			errs = append(errs, &flagcheck.Error{Flag: "bundle-formats", Msg: fmt.Sprintf("%q is not one of zstd, gzip, none", s)})
		case seen[c]:
			errs = append(errs, &flagcheck.Error{Flag: "bundle-formats", Msg: fmt.Sprintf("%s is listed twice", s)})
		default:
			seen[c] = true
			comps = append(comps, c)
		}
	}
	return comps, flagcheck.All(errs...)
}
