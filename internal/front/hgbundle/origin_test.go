package hgbundle

import (
	"bytes"
	"compress/zlib"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
)

const testCaps = "batch bundle2=HG20%0Achangegroup%3D01%2C02%0Astream%3Dv2 compression=zstd,zlib getbundle " +
	"httpheader=1024 httpmediatype=0.1rx,0.1tx,0.2tx known lookup streamreqs=generaldelta,revlogv1"

// fakeOrigin answers capabilities and heads, and getbundle with body in the encoding encode
// writes; it records the last getbundle request.
type fakeOrigin struct {
	body   []byte
	encode func(w http.ResponseWriter, body []byte)
	last   *http.Request
}

func (f *fakeOrigin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Query().Get("cmd") {
	case "capabilities":
		w.Header().Set("Content-Type", "application/mercurial-0.1")
		io.WriteString(w, testCaps)
	case "heads":
		w.Header().Set("Content-Type", "application/mercurial-0.1")
		io.WriteString(w, strings.Repeat("ab", 20)+" "+strings.Repeat("0c", 20)+"\n")
	case "getbundle":
		f.last = r
		f.encode(w, f.body)
	default:
		http.NotFound(w, r)
	}
}

func v2(name string, enc func(io.Writer) io.WriteCloser) func(http.ResponseWriter, []byte) {
	return func(w http.ResponseWriter, body []byte) {
		w.Header().Set("Content-Type", "application/mercurial-0.2")
		w.Write(append([]byte{byte(len(name))}, name...))
		if enc == nil {
			w.Write(body)
			return
		}
		z := enc(w)
		z.Write(body)
		z.Close()
	}
}

func zlibEnc(w io.Writer) io.WriteCloser { return zlib.NewWriter(w) }
func zstdEnc(w io.Writer) io.WriteCloser {
	z, _ := zstd.NewWriter(w)
	return z
}

// truncate cuts what enc writes to its first n bytes.
func truncate(n int, enc func(http.ResponseWriter, []byte)) func(http.ResponseWriter, []byte) {
	return func(w http.ResponseWriter, body []byte) {
		rec := httptest.NewRecorder()
		enc(rec, body)
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.Write(rec.Body.Bytes()[:n])
	}
}

func TestFullBundleDecodesEveryTransportAndChecksTheStream(t *testing.T) {
	bundle := writeBundle("", testPart{typ: "CHANGEGROUP", mandatory: []Param{{"version", "02"}},
		chunks: [][]byte{bytes.Repeat([]byte("delta "), 5000)}})
	tests := []struct {
		name    string
		encode  func(http.ResponseWriter, []byte)
		wantErr string
	}{
		{"0.2 zstd", v2("zstd", zstdEnc), ""},
		{"0.2 zlib", v2("zlib", zlibEnc), ""},
		{"0.2 none", v2("none", nil), ""},
		{"0.1 zlib", func(w http.ResponseWriter, b []byte) {
			w.Header().Set("Content-Type", "application/mercurial-0.1")
			z := zlib.NewWriter(w)
			z.Write(b)
			z.Close()
		}, ""},
		{"0.2 truncated zstd", truncate(60, v2("zstd", zstdEnc)), "unexpected EOF"},
		{"0.2 truncated none", truncate(2000, v2("none", nil)), "truncated"},
		{"0.2 bzip2", v2("bzip2", nil), "not offered"},
		{"hg-error", func(w http.ResponseWriter, _ []byte) {
			w.Header().Set("Content-Type", "application/hg-error")
			io.WriteString(w, "bundle2 is required")
		}, "bundle2 is required"},
		{"html", func(w http.ResponseWriter, _ []byte) {
			w.Header().Set("Content-Type", "text/html")
			io.WriteString(w, "<html>")
		}, "not a Mercurial answer"},
		{"forbidden", func(w http.ResponseWriter, _ []byte) { http.Error(w, "no", http.StatusForbidden) }, "403"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fakeOrigin{body: bundle, encode: tt.encode}
			srv := httptest.NewServer(f)
			defer srv.Close()
			o := &Origin{URL: srv.URL + "/repo"}
			ctx := context.Background()
			caps, err := o.Capabilities(ctx)
			if err != nil {
				t.Fatal(err)
			}
			b, err := o.FullBundle(ctx, caps, nil)
			var got []byte
			if err == nil {
				got, err = io.ReadAll(b.Body)
				b.Body.Close()
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want one mentioning %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, bundle) {
				t.Fatal("bundle differs")
			}
			if len(b.Heads) != 2 || b.Heads[0].String() != strings.Repeat("0c", 20) || b.Spec != "none-v2" {
				t.Errorf("heads %v spec %s", b.Heads, b.Spec)
			}
			r := f.last
			if got := r.Header.Get("X-HgProto-1"); got != "0.1 0.2 comp=zstd,zlib,none" {
				t.Errorf("X-HgProto-1 %q", got)
			}
			if r.URL.Path != "/repo" || r.URL.RawQuery != "cmd=getbundle" {
				t.Errorf("request %s", r.URL)
			}
			var args strings.Builder
			for i := 1; r.Header.Get("X-HgArg-"+strconv.Itoa(i)) != ""; i++ {
				v := r.Header.Get("X-HgArg-" + strconv.Itoa(i))
				if len("X-HgArg-1: ")+len(v)+2 > 1024 {
					t.Errorf("X-HgArg-%d is %d bytes, over httpheader=1024", i, len(v))
				}
				args.WriteString(v)
			}
			q, err := url.ParseQuery(args.String())
			if err != nil {
				t.Fatal(err)
			}
			want := url.Values{
				"bundlecaps": {"HG20,bundle2=HG20%0Achangegroup%3D02%0Aerror%3Dabort%2Cunsupportedcontent%2Cpushraced%2Cpushkey%0Ahgtagsfnodes%0Arev-branch-cache%0Astream%3Dv2"},
				"cg":         {"1"},
				"common":     {strings.Repeat("0", 40)},
				"heads":      {strings.Repeat("0c", 20) + " " + strings.Repeat("ab", 20)},
			}
			if q.Encode() != want.Encode() {
				t.Errorf("arguments\n got %v\nwant %v", q, want)
			}
		})
	}
}

func TestStreamBundleNeedsTheOriginsConsent(t *testing.T) {
	ctx := context.Background()
	o := &Origin{URL: "http://127.0.0.1:1/"}
	for name, caps := range map[string]string{
		"no stream":     "batch bundle2=HG20%0Astream%3Dv2 getbundle httpheader=1024",
		"no stream v2":  "batch bundle2=HG20%0Achangegroup%3D02 getbundle streamreqs=revlogv1",
		"no bundle2":    "batch getbundle stream",
		"bundle2 empty": "batch bundle2= getbundle stream",
	} {
		c, _ := ParseCaps([]byte(caps))
		if _, err := o.StreamBundle(ctx, c, []Node{{1}}); err == nil {
			t.Errorf("%s: asked the origin for a stream", name)
		}
	}
	c, _ := ParseCaps([]byte(testCaps))
	if _, err := o.FullBundle(ctx, c, []Node{NullNode}); !errors.Is(err, ErrEmptyRepository) {
		t.Errorf("empty repository: %v", err)
	}
}
