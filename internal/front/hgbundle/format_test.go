package hgbundle

import (
	"bytes"
	"compress/zlib"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
)

func TestQuoteMatchesPython(t *testing.T) {
	for in, want := range map[string]string{
		"zstd-v2":                 "zstd-v2",
		"none-v2;stream=v2":       "none-v2%3Bstream%3Dv2",
		"requirements%3Dgd%2Crv1": "requirements%253Dgd%252Crv1",
		"a b/c~d_e.f":             "a%20b/c~d_e.f",
		"HG20\nchangegroup=01,02": "HG20%0Achangegroup%3D01%2C02",
		"caf\u00e9":               "caf%C3%A9",
	} {
		if got := Quote(in); got != want {
			t.Errorf("Quote(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestManifestLines(t *testing.T) {
	stream := StreamBundleSpec("generaldelta%2Crevlogv1%2Csparserevlog")
	tests := []struct {
		name    string
		entry   Entry
		want    string
		wantErr string
	}{
		{"plain", Entry{URL: "https://b.example/r/1.zstd.hg", BundleSpec: "zstd-v2", RequiresSNI: true},
			"https://b.example/r/1.zstd.hg BUNDLESPEC=zstd-v2 REQUIRESNI=true", ""},
		{"stream and extras", Entry{URL: "http://b/s.hg?X-Goog-Signature=ab%2Fcd", BundleSpec: stream, RequiredRAM: "64MB",
			Attrs: []Param{{"region", "eu west"}}},
			"http://b/s.hg?X-Goog-Signature=ab%2Fcd BUNDLESPEC=none-v2;stream=v2;requirements%3Dgeneraldelta%2Crevlogv1%2Csparserevlog REQUIREDRAM=64MB region=eu%20west", ""},
		{"no url", Entry{BundleSpec: "gzip-v2"}, "", "empty URL"},
		{"space in url", Entry{URL: "http://b/a b", BundleSpec: "gzip-v2"}, "", "white space"},
		{"not http", Entry{URL: "file:///etc/passwd", BundleSpec: "gzip-v2"}, "", "scheme"},
		{"no spec", Entry{URL: "http://b/a"}, "", "BUNDLESPEC"},
		{"spec with space", Entry{URL: "http://b/a", BundleSpec: "gzip-v2;x=a b"}, "", "BUNDLESPEC"},
		{"url attr", Entry{URL: "http://b/a", BundleSpec: "gzip-v2", Attrs: []Param{{"URL", "x"}}}, "", "URL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.entry.Line()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want one mentioning %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("\n got %s\nwant %s", got, tt.want)
			}
			back, err := ParseManifest([]byte(got + "\n"))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(back, []Entry{tt.entry}) {
				t.Errorf("round trip: %+v", back)
			}
		})
	}
	if m, err := EncodeManifest(nil); err != nil || len(m) != 0 {
		t.Errorf("empty manifest: %q, %v", m, err)
	}
}

// TestMercurialReadsTheManifest runs Mercurial 6.3.2's own parser and filter over a manifest
// this package wrote: the client must see the specs as written and keep what it can apply.
func TestMercurialReadsTheManifest(t *testing.T) {
	py := "/usr/bin/python3"
	if out, err := exec.Command(py, "-c", "import mercurial.bundlecaches").CombinedOutput(); err != nil {
		t.Skipf("no Mercurial 6 Python modules: %v %s", err, out)
	}
	stream := StreamBundleSpec("generaldelta%2Crevlog-compression-zstd%2Crevlogv1%2Csparserevlog")
	m, err := EncodeManifest([]Entry{
		{URL: "http://b/s.hg", BundleSpec: stream},
		{URL: "https://b/z.hg", BundleSpec: Zstd.BundleSpec(), RequiresSNI: true},
		{URL: "http://b/g.hg", BundleSpec: Gzip.BundleSpec(), Attrs: []Param{{"region", "eu"}}},
		{URL: "http://b/x.hg", BundleSpec: "lz4-v2"},
	})
	if err != nil {
		t.Fatal(err)
	}
	script := `
import json, sys
from mercurial import bundlecaches, ui as uimod
class repo:
    requirements = set()
    ui = uimod.ui.load()
m = sys.stdin.buffer.read()
out = []
for stream in (False, True):
    es = bundlecaches.parseclonebundlesmanifest(repo, m)
    es = bundlecaches.filterclonebundleentries(repo, es, streamclonerequested=stream)
    out.append([{k.decode(): v.decode() for k, v in e.items()} for e in es])
print(json.dumps(out))
`
	cmd := exec.Command(py, "-c", script)
	cmd.Env = append(os.Environ(), "HGRCPATH=")
	cmd.Stdin = bytes.NewReader(m)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("python: %v", err)
	}
	var got [][]map[string]string
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	urls := func(es []map[string]string) (u []string) {
		for _, e := range es {
			u = append(u, e["URL"])
		}
		return u
	}
	if want := []string{"http://b/s.hg", "https://b/z.hg", "http://b/g.hg"}; !reflect.DeepEqual(urls(got[0]), want) {
		t.Errorf("kept %v, want %v (lz4 is no bundle compression)", urls(got[0]), want)
	}
	if want := []string{"http://b/s.hg"}; !reflect.DeepEqual(urls(got[1]), want) {
		t.Errorf("with --stream kept %v, want %v", urls(got[1]), want)
	}
	e := got[0]
	if e[0]["BUNDLESPEC"] != "none-v2;stream=v2;requirements=generaldelta,revlog-compression-zstd,revlogv1,sparserevlog" ||
		e[0]["COMPRESSION"] != "none" || e[0]["VERSION"] != "v2" {
		t.Errorf("stream entry read as %v", e[0])
	}
	if e[1]["COMPRESSION"] != "zstd" || e[1]["REQUIRESNI"] != "true" {
		t.Errorf("zstd entry read as %v", e[1])
	}
	if e[2]["COMPRESSION"] != "gzip" || e[2]["region"] != "eu" {
		t.Errorf("gzip entry read as %v", e[2])
	}
	if reqs, ok := StreamSpecRequirements(e[0]["BUNDLESPEC"]); !ok ||
		!reflect.DeepEqual(reqs, []string{"generaldelta", "revlog-compression-zstd", "revlogv1", "sparserevlog"}) {
		t.Errorf("StreamSpecRequirements: %v %v", reqs, ok)
	}
}

func TestStreamSpecRequirements(t *testing.T) {
	for spec, want := range map[string][]string{
		"none-v2;stream=v2;requirements%3Dgeneraldelta%2Crevlogv1": {"generaldelta", "revlogv1"},
		"none-v2;stream=v2;requirements=generaldelta,revlogv1":     {"generaldelta", "revlogv1"},
		"none-v2;stream=v2;requirements%3D":                        nil,
	} {
		got, ok := StreamSpecRequirements(spec)
		if !ok || !reflect.DeepEqual(got, want) {
			t.Errorf("%s: %v %v, want %v", spec, got, ok, want)
		}
	}
	for _, spec := range []string{"zstd-v2", "none-v2", "none-packed1;requirements%3Drevlogv1"} {
		if _, ok := StreamSpecRequirements(spec); ok {
			t.Errorf("%s taken for a stream v2 spec", spec)
		}
	}
}

func TestCapabilities(t *testing.T) {
	body := []byte("batch branchmap bundle2=HG20%0Abookmarks%0Achangegroup%3D01%2C02%0Astream%3Dv2 " +
		"changegroupsubset compression=zstd,zlib getbundle httpheader=1024 httpmediatype=0.1rx,0.1tx,0.2tx " +
		"known lookup pushkey streamreqs=generaldelta,revlogv1,sparserevlog unbundle=HG10GZ,HG10BZ,HG10UN unbundlehash\n")
	caps, err := ParseCaps(body)
	if err != nil {
		t.Fatal(err)
	}
	if caps.HTTPHeaderLimit() != 1024 {
		t.Errorf("httpheader %d", caps.HTTPHeaderLimit())
	}
	b2, err := caps.Bundle2()
	if err != nil {
		t.Fatal(err)
	}
	if !b2.Has("changegroup", "02") || !b2.Has("stream", "v2") || !b2.Has("bookmarks", "") || b2.Has("changegroup", "03") {
		t.Errorf("bundle2 caps %v", b2)
	}
	if reqs, ok := caps.StreamRequirements(); !ok || len(reqs) != 3 {
		t.Errorf("stream requirements %v %v", reqs, ok)
	}
	rewritten, err := AddCloneBundles(body)
	if err != nil {
		t.Fatal(err)
	}
	want := strings.Replace(strings.TrimSpace(string(body)), "changegroupsubset", "changegroupsubset clonebundles", 1)
	if string(rewritten) != want {
		t.Errorf("rewrite:\n got %s\nwant %s", rewritten, want)
	}
	again, _ := AddCloneBundles(rewritten)
	if !bytes.Equal(again, rewritten) {
		t.Error("adding clonebundles twice changed the list")
	}
	if _, err := AddCloneBundles([]byte("  \n")); err == nil {
		t.Error("empty capabilities accepted")
	}
	if enc := BundleCaps().Encode(); enc != "HG20\nchangegroup=02\nerror=abort,unsupportedcontent,pushraced,pushkey\nhgtagsfnodes\nrev-branch-cache\nstream=v2" {
		t.Errorf("bundle caps %q", enc)
	}
	back, err := DecodeBundle2Caps(BundleCaps().Encode())
	if err != nil || !reflect.DeepEqual(back, BundleCaps()) {
		t.Errorf("bundle caps round trip: %v %v", back, err)
	}
}

func TestKeyNamesHeadsFormatAndRepository(t *testing.T) {
	a, _ := ParseNode(strings.Repeat("a", 40))
	b, _ := ParseNode(strings.Repeat("b", 40))
	base := KeyInput{RepoID: "origin-1", RepoPath: "r", Heads: []Node{a, b}, BundleSpec: "zstd-v2", Version: 1}
	k0, err := Key(base)
	if err != nil {
		t.Fatal(err)
	}
	same := base
	same.Heads = []Node{b, a, b}
	if k, _ := Key(same); k != k0 {
		t.Error("head order or duplicates changed the key")
	}
	for name, mod := range map[string]func(*KeyInput){
		"repo id":  func(k *KeyInput) { k.RepoID = "origin-2" },
		"path":     func(k *KeyInput) { k.RepoPath = "s" },
		"heads":    func(k *KeyInput) { k.Heads = []Node{a} },
		"spec":     func(k *KeyInput) { k.BundleSpec = "gzip-v2" },
		"version":  func(k *KeyInput) { k.Version = 2 },
		"stream":   func(k *KeyInput) { k.BundleSpec = StreamBundleSpec("revlogv1") },
		"stream 2": func(k *KeyInput) { k.BundleSpec = StreamBundleSpec("generaldelta%2Crevlogv1") },
	} {
		in := base
		in.Heads = append([]Node(nil), base.Heads...)
		mod(&in)
		if k, err := Key(in); err != nil || k == k0 {
			t.Errorf("%s: key %s, %v (want a different key)", name, k, err)
		}
	}
	for name, in := range map[string]KeyInput{
		"no repo":   {Heads: []Node{a}, BundleSpec: "zstd-v2"},
		"no heads":  {RepoID: "o", BundleSpec: "zstd-v2"},
		"null head": {RepoID: "o", Heads: []Node{NullNode}, BundleSpec: "zstd-v2"},
		"bad spec":  {RepoID: "o", Heads: []Node{a}, BundleSpec: "zstd"},
	} {
		if _, err := Key(in); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestCompressWritesTheStreamParameterAndCompressesTheRest(t *testing.T) {
	in := writeBundle("", testPart{typ: "CHANGEGROUP", mandatory: []Param{{"version", "02"}},
		chunks: [][]byte{bytes.Repeat([]byte("abcdefgh"), 10000)}})
	for _, c := range Compressions {
		t.Run(string(c), func(t *testing.T) {
			var out bytes.Buffer
			if err := Compress(&out, bytes.NewReader(in), c); err != nil {
				t.Fatal(err)
			}
			r := bytes.NewReader(out.Bytes())
			params, err := readStreamHeader(r)
			if c == None {
				if err != nil || len(params) != 0 || !bytes.Equal(out.Bytes(), in) {
					t.Fatalf("none changed the stream: %v %v", params, err)
				}
				return
			}
			if err == nil {
				t.Fatal("compressed output read as uncompressed")
			}
			hdr := out.Bytes()[:8+len("Compression=GZ")]
			wire, _ := c.wireName()
			if string(hdr) != "HG20\x00\x00\x00\x0eCompression="+wire {
				t.Fatalf("header %q", hdr)
			}
			rest := bytes.NewReader(out.Bytes()[len(hdr):])
			var dec io.Reader
			switch c {
			case Gzip:
				z, err := zlib.NewReader(rest)
				if err != nil {
					t.Fatal(err)
				}
				dec = z
			case Zstd:
				z, err := zstd.NewReader(rest)
				if err != nil {
					t.Fatal(err)
				}
				defer z.Close()
				dec = z
			}
			body, err := io.ReadAll(dec)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(body, in[8:]) {
				t.Fatal("decompressed body differs")
			}
			if out.Len() > len(in)/10 {
				t.Errorf("%d bytes from %d: not compressed", out.Len(), len(in))
			}
		})
	}
	if err := Compress(io.Discard, bytes.NewReader(writeBundle("Compression=ZS")), Gzip); err == nil {
		t.Error("compressed a compressed stream")
	}
	if err := Compress(io.Discard, bytes.NewReader(in), "bzip2"); err == nil {
		t.Error("accepted bzip2")
	}
	if _, err := io.ReadAll(CompressReader(bytes.NewReader([]byte("HG10UN")), Zstd)); err == nil {
		t.Error("CompressReader hid the error of a stream that is not HG20")
	}
	var direct bytes.Buffer
	if err := Compress(&direct, bytes.NewReader(in), Zstd); err != nil {
		t.Fatal(err)
	}
	piped, err := io.ReadAll(CompressReader(bytes.NewReader(in), Zstd))
	if err != nil || !bytes.Equal(piped, direct.Bytes()) {
		t.Errorf("CompressReader differs from Compress (%v)", err)
	}
}

func TestForClientDropsWhatTheClientCannotDecode(t *testing.T) {
	zstdStream := Entry{URL: "http://b/s1", BundleSpec: StreamBundleSpec("generaldelta%2Crevlog-compression-zstd%2Crevlogv1")}
	zlibStream := Entry{URL: "http://b/s2", BundleSpec: StreamBundleSpec("generaldelta%2Crevlogv1")}
	z := Entry{URL: "http://b/z", BundleSpec: "zstd-v2"}
	g := Entry{URL: "http://b/g", BundleSpec: "gzip-v2"}
	all := []Entry{zstdStream, zlibStream, z, g}
	urls := func(es []Entry) (out []string) {
		for _, e := range es {
			out = append(out, e.URL)
		}
		return out
	}
	for name, tt := range map[string]struct {
		headers map[string]string
		want    []string
	}{
		"6.3.2":         {map[string]string{"X-HgProto-1": "0.1 0.2 comp=zstd,zlib,none,bzip2 partial-pull"}, urls(all)},
		"5.6.1 no zstd": {map[string]string{"X-HgProto-1": "0.1 0.2 comp=zlib,none,bzip2 partial-pull"}, []string{"http://b/s2", "http://b/g"}},
		"split header":  {map[string]string{"X-HgProto-1": "0.1 0.2 comp=zs", "X-HgProto-2": "td,zlib"}, urls(all)},
		"nothing said":  {nil, []string{"http://b/s2", "http://b/g"}},
		"header gap":    {map[string]string{"X-HgProto-2": "comp=zstd"}, []string{"http://b/s2", "http://b/g"}},
	} {
		h := http.Header{}
		for k, v := range tt.headers {
			h.Set(k, v)
		}
		if got := urls(ForClient(all, h)); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: %v, want %v", name, got, tt.want)
		}
	}
}
