package targets

import (
	"strings"
	"testing"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

func publicBase(u string) func(*pb.Target) {
	return func(t *pb.Target) { t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: u}} }
}

func cdnBase(u string) func(*pb.Target) {
	return func(t *pb.Target) { t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_CdnBaseUrl{CdnBaseUrl: u}} }
}

// URLs that clients see or that object names are appended to carry no credentials (every reader
// of the target, and every client of the advertisement, would see them), and base URLs no query
// or fragment (an appended name would not be part of the path). The error names the field and
// never repeats the password.
func TestURLsWithCredentialsQueryOrFragmentAreRejected(t *testing.T) {
	const pub, cdn = "target.url_form.public_base_url", "target.url_form.cdn_base_url"
	for _, c := range []struct {
		field, want string
		edit        func(*pb.Target)
	}{
		{pub, "credentials", publicBase("https://user:s3cret@storage.example.com/b/")},
		{pub, "credentials", publicBase("https://s3cret@storage.example.com/b/")},
		{pub, "query", publicBase("https://storage.example.com/b/?sig=abc")},
		{pub, "query", publicBase("https://storage.example.com/b/?")},
		{pub, "fragment", publicBase("https://storage.example.com/b/#top")},
		{pub, "fragment", publicBase("https://storage.example.com/b/#")},
		{cdn, "credentials", cdnBase("https://user:s3cret@cdn.example.com/")},
		{cdn, "query", cdnBase("https://cdn.example.com/?token=1")},
		{cdn, "fragment", cdnBase("https://cdn.example.com/#x")},
		{"target.uris[0]", "credentials", func(t *pb.Target) { t.Uris = []string{"https://user:s3cret@cdn.example.com/"} }},
	} {
		t.Run(c.field+"/"+c.want, func(t *testing.T) {
			err := checkTarget(c.edit)()
			mustReject(t, err, c.field, c.want)
			if strings.Contains(err.Error(), "s3cret") {
				t.Fatalf("the error repeats the password: %v", err)
			}
		})
	}
	for _, ok := range []func(*pb.Target){publicBase("https://storage.example.com/b/"), cdnBase("https://cdn.example.com/hg")} {
		if err := checkTarget(ok)(); err != nil {
			t.Errorf("a plain base URL was rejected: %v", err)
		}
	}
}

// A min_redirect_bytes past 1 GiB would redirect almost nothing while misses still fill: it is
// refused, naming the field; the limit itself is accepted.
func TestMinRedirectBytesThatDisablesRedirectsIsRejected(t *testing.T) {
	mustReject(t, checkPolicy(func(p *pb.Policy) { p.MinRedirectBytes = 1<<64 - 1 })(), "policy.min_redirect_bytes", "1073741824")
	mustReject(t, checkPolicy(func(p *pb.Policy) { p.MinRedirectBytes = MaxMinRedirectBytes + 1 })(), "policy.min_redirect_bytes", "1 GiB")
	if err := checkPolicy(func(p *pb.Policy) { p.MinRedirectBytes = MaxMinRedirectBytes })(); err != nil {
		t.Fatal(err)
	}
}
