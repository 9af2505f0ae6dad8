package main

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/detourhq/detour/internal/flagcheck"
	"github.com/detourhq/detour/internal/front/hgbundle"
)

// Good --bundle-step and --bundle-formats values pass and keep the operator's order (best
// first); every bad one is reported, each naming its flag, not only the first.
func TestBundleFlags(t *testing.T) {
	for _, c := range []struct {
		step    int
		formats string
		want    []hgbundle.Compression
		errs    []string // substrings, each of one reported error
	}{
		{0, "zstd,gzip", []hgbundle.Compression{hgbundle.Zstd, hgbundle.Gzip}, nil},
		{maxBundleStep, " none , zstd", []hgbundle.Compression{hgbundle.None, hgbundle.Zstd}, nil},
		{1, "gzip", []hgbundle.Compression{hgbundle.Gzip}, nil},
		{-1, "gzip", nil, []string{"--bundle-step: -1 is not between 0 and 1048576"}},
		{maxBundleStep + 1, "gzip", nil, []string{"--bundle-step: 1048577"}},
		{0, "", nil, []string{`--bundle-formats: "" is not one of zstd, gzip, none`}},
		{0, "zstd,,gzip", nil, []string{`--bundle-formats: "" is not one`}},
		{0, "ZSTD", nil, []string{`--bundle-formats: "ZSTD" is not one`}},
		{0, "bzip2", nil, []string{`--bundle-formats: "bzip2" is not one`}},
		{0, "zstd,gzip,zstd", nil, []string{"--bundle-formats: zstd is listed twice"}},
		{-5, "gzip,lz4,gzip", nil, []string{"--bundle-step: -5", `--bundle-formats: "lz4"`, "--bundle-formats: gzip is listed twice"}},
	} {
		got, err := checkBundleFlags(c.step, c.formats)
		if len(c.errs) == 0 {
			if err != nil || !slices.Equal(got, c.want) {
				t.Errorf("step %d, formats %q: %v, %v; want %v", c.step, c.formats, got, err, c.want)
			}
			continue
		}
		var fe *flagcheck.Error
		if err == nil || !errors.As(err, &fe) {
			t.Errorf("step %d, formats %q: %v, want a flagcheck.Error", c.step, c.formats, err)
			continue
		}
		lines := strings.Split(err.Error(), "\n")
		if len(lines) != len(c.errs) {
			t.Errorf("step %d, formats %q: %d errors %q, want %d", c.step, c.formats, len(lines), lines, len(c.errs))
			continue
		}
		for i, want := range c.errs {
			if !strings.Contains(lines[i], want) {
				t.Errorf("step %d, formats %q: error %d is %q, want it to say %q", c.step, c.formats, i, lines[i], want)
			}
		}
	}
}
