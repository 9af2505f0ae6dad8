package hgbundle

// Talking to an origin over HTTP, wire protocol v1, as Mercurial's httppeer does, with no access
// to its files.
//
// A command is `GET <repo>?cmd=<name>`; arguments travel URL-encoded (sorted, as
// urllib.urlencode writes them) in X-HgArg-1, X-HgArg-2 … headers of at most `httpheader` bytes
// each, and the client's protocol parameters in X-HgProto-1 ("0.1 0.2 comp=zstd,zlib,none").
// Answers are `application/mercurial-0.1` (plain for bytes answers; zlib for a streamed one
// such as getbundle) or `application/mercurial-0.2` (a one-byte length, the name of the
// compression engine, then the body in that engine); `application/hg-error` carries an error.
//
// Transport compression: an origin never answers `comp=none` alone with an uncompressed body.
// Mercurial's server picks the first engine of its own list that the client names, and "none"
// is not on that list by default (its server priority is 0: wireprotoserver._httpresponsetype),
// so with nothing else to agree on it falls back to 0.1 and zlib. It sends uncompressed only for
// answers that prefer it (a stream clone). So this client offers what a stock client offers and
// decodes whatever comes: a fill then costs the origin what a clone costs it.

import (
	"bufio"
	"compress/zlib"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strings"

	"github.com/klauspost/compress/zstd"
)

// DefaultWireCompression is what a stock client with zstd offers (httppeer, without bzip2,
// which is slow and which no server prefers).
var DefaultWireCompression = []string{"zstd", "zlib", "none"}

// Origin is a Mercurial repository served over HTTP.
type Origin struct {
	URL    string       // the repository's URL, e.g. http://127.0.0.1:8000/ or …/hgweb/repo
	Client *http.Client // nil: http.DefaultClient
	// Header is added to every request (credentials the origin wants, say).
	Header http.Header
	// WireCompression are the transport compressions offered on getbundle, best first
	// (default DefaultWireCompression).
	WireCompression []string
	// UserAgent identifies the client to the origin (default "mercurial/proto-1.0 (Detour)",
	// the prefix Mercurial's clients send).
	UserAgent string
}

// ErrEmptyRepository is returned for a bundle of a repository with no changesets.
var ErrEmptyRepository = errors.New("origin repository is empty")

// ErrHeadsMoved is returned at the end of a stream bundle when the origin's heads changed while
// it was streamed: the stream may cover changesets its key does not name. Try again later.
var ErrHeadsMoved = errors.New("origin heads changed while the stream bundle was read")

// BundleCaps are the bundle2 capabilities this package sends with getbundle: a 6.3.2 client's
// (bundle2.getrepocaps, role client), less what would put other content in a clone bundle
// (remote-changegroup would let the origin answer with a URL to another bundle; bookmarks,
// listkeys and phases only matter when requested, and are not) and less what only pushes use
// (checkheads, digests, pushkey); with changegroup limited to 02, the version the v2 bundle spec
// means, and rev-branch-cache, which clients no longer advertise but servers still honour, so
// that the bundle carries the same parts as `hg bundle --all --type <c>-v2`.
func BundleCaps() Bundle2Caps {
	return Bundle2Caps{
		"HG20":             nil,
		"changegroup":      {"02"},
		"error":            {"abort", "unsupportedcontent", "pushraced", "pushkey"},
		"hgtagsfnodes":     nil,
		"rev-branch-cache": nil,
		"stream":           {"v2"},
	}
}

func (o *Origin) client() *http.Client {
	if o.Client != nil {
		return o.Client
	}
	return http.DefaultClient
}

// Capabilities reads the origin's v1 capabilities.
func (o *Origin) Capabilities(ctx context.Context) (Caps, error) {
	body, err := o.callBytes(ctx, "capabilities", nil, nil)
	if err != nil {
		return nil, err
	}
	return ParseCaps(body)
}

// Heads reads the origin's heads (the `heads` command: the served repository's topological
// heads, hidden and secret changesets excluded).
func (o *Origin) Heads(ctx context.Context, caps Caps) ([]Node, error) {
	body, err := o.callBytes(ctx, "heads", caps, nil)
	if err != nil {
		return nil, err
	}
	var out []Node
	for _, f := range strings.Fields(string(body)) {
		n, err := ParseNode(f)
		if err != nil {
			return nil, fmt.Errorf("heads: %w", err)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, errors.New("heads: empty answer")
	}
	return out, nil
}

// Bundle is a bundle being read from the origin.
type Bundle struct {
	// Heads are the heads the bundle covers, sorted.
	Heads []Node
	// Spec is the BUNDLESPEC of Body as it is: "none-v2" for a changegroup bundle, or a stream
	// bundle's "none-v2;stream=v2;requirements%3D…".
	Spec string
	// Body is the uncompressed HG20 stream, checked as it is read (see Reader): a Read returns
	// an error rather than io.EOF unless the whole bundle arrived intact. Close it.
	Body io.ReadCloser
}

// FullBundle asks the origin for the full bundle a clone gets: getbundle with common = the null
// node, heads = heads, cg=1, bundlecaps HG20 and BundleCaps; no phases, bookmarks, listkeys or
// obsolescence markers (see the package doc). heads nil means the origin's heads now. caps are
// the origin's capabilities (for the argument headers' size, and bundle2 support).
func (o *Origin) FullBundle(ctx context.Context, caps Caps, heads []Node) (*Bundle, error) {
	heads, err := o.bundleHeads(ctx, caps, heads)
	if err != nil {
		return nil, err
	}
	args := o.bundleArgs(heads)
	args.Set("cg", "1")
	body, err := o.callStream(ctx, "getbundle", caps, args)
	if err != nil {
		return nil, err
	}
	return &Bundle{Heads: heads, Spec: None.BundleSpec(), Body: readCloser{NewReader(body), body}}, nil
}

// StreamBundle asks the origin for a stream clone over getbundle, as `hg clone --stream` does
// with bundle2: cg=0, stream=1 (bundle2.addpartbundlestream2); the answer is an HG20 stream with
// one stream2 part, which is exactly a stream clone bundle file. It fails unless the origin
// allows streaming clones (`stream` or `streamreqs=`, and `stream=v2` in its bundle2
// capabilities). A stream copies the whole store at the moment the origin locks it, whatever
// heads are asked for, so Body reads the heads again when the stream ends and fails with
// ErrHeadsMoved if they changed; heads nil means the origin's heads now.
func (o *Origin) StreamBundle(ctx context.Context, caps Caps, heads []Node) (*Bundle, error) {
	if _, ok := caps.StreamRequirements(); !ok {
		return nil, errors.New("stream bundle: the origin does not allow streaming clones (no stream or streamreqs capability)")
	}
	b2, err := caps.Bundle2()
	if err != nil {
		return nil, fmt.Errorf("stream bundle: %w", err)
	}
	if !b2.Has("stream", "v2") {
		return nil, errors.New("stream bundle: the origin does not offer stream v2 over bundle2")
	}
	heads, err = o.bundleHeads(ctx, caps, heads)
	if err != nil {
		return nil, err
	}
	args := o.bundleArgs(heads)
	args.Set("cg", "0")
	args.Set("stream", "1")
	body, err := o.callStream(ctx, "getbundle", caps, args)
	if err != nil {
		return nil, err
	}
	r := NewReader(body)
	part, err := r.NextPart()
	if err == io.EOF {
		err = errors.New("stream bundle: the origin's answer has no part")
	}
	if err != nil {
		body.Close()
		return nil, err
	}
	if !strings.EqualFold(part.Type, "stream2") {
		body.Close()
		return nil, fmt.Errorf("stream bundle: first part is %q, not stream2", part.Type)
	}
	reqs, ok := part.Param("requirements")
	if !ok {
		body.Close()
		return nil, errors.New("stream bundle: stream2 part without requirements")
	}
	check := &headsCheck{r: r, o: o, ctx: ctx, caps: caps, heads: heads}
	return &Bundle{Heads: heads, Spec: StreamBundleSpec(reqs), Body: readCloser{check, body}}, nil
}

// StreamBundleSpec is the BUNDLESPEC of a stream v2 bundle whose stream2 part has the
// requirements parameter reqs (as the part carries it: the requirements sorted, joined with ","
// and URL-quoted), as `hg debugbundle --spec` prints it.
func StreamBundleSpec(reqs string) string {
	return "none-v2;stream=v2;requirements%3D" + reqs
}

// StreamSpecRequirements returns the store requirements a stream bundle spec names, and false
// when spec is not a stream v2 spec.
func StreamSpecRequirements(spec string) ([]string, bool) {
	rest, ok := strings.CutPrefix(spec, "none-v2;")
	if !ok {
		return nil, false
	}
	stream := false
	var reqs []string
	for _, p := range strings.Split(rest, ";") {
		// A parameter is key=value with both quoted; a value may itself arrive unquoted once
		// more ("requirements%3D…" inside the spec: Mercurial's own form).
		p, err := url.PathUnescape(p)
		if err != nil {
			return nil, false
		}
		k, v, _ := strings.Cut(p, "=")
		switch k {
		case "stream":
			stream = v == "v2"
		case "requirements":
			v, err := url.PathUnescape(v)
			if err != nil {
				return nil, false
			}
			if v != "" {
				reqs = strings.Split(v, ",")
			}
		}
	}
	return reqs, stream
}

func (o *Origin) bundleHeads(ctx context.Context, caps Caps, heads []Node) ([]Node, error) {
	if _, err := caps.Bundle2(); err != nil {
		return nil, fmt.Errorf("bundle: %w", err)
	}
	if heads == nil {
		var err error
		if heads, err = o.Heads(ctx, caps); err != nil {
			return nil, err
		}
	}
	var out []Node
	for _, h := range heads {
		if h != NullNode {
			out = append(out, h)
		}
	}
	if len(out) == 0 {
		return nil, ErrEmptyRepository
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out, nil
}

// bundleArgs are the getbundle arguments every bundle request carries.
func (o *Origin) bundleArgs(heads []Node) url.Values {
	hs := make([]string, len(heads))
	for i, h := range heads {
		hs[i] = h.String()
	}
	args := url.Values{}
	// bundlecaps is a sorted, comma-separated set; "HG20" sorts before "bundle2=…".
	args.Set("bundlecaps", "HG20,bundle2="+Quote(BundleCaps().Encode()))
	args.Set("common", NullNode.String())
	args.Set("heads", strings.Join(hs, " "))
	return args
}

// headsCheck fails the end of a stream bundle if the origin's heads moved while it streamed.
type headsCheck struct {
	r     *Reader
	o     *Origin
	ctx   context.Context
	caps  Caps
	heads []Node
	done  bool
}

func (h *headsCheck) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	if err != io.EOF || h.done {
		return n, err
	}
	h.done = true
	now, herr := h.o.bundleHeads(h.ctx, h.caps, nil)
	if herr != nil {
		return n, fmt.Errorf("stream bundle: read heads after the stream: %w", herr)
	}
	if strings.Join(sortedHex(now), " ") != strings.Join(sortedHex(h.heads), " ") {
		return n, ErrHeadsMoved
	}
	return n, io.EOF
}

type readCloser struct {
	io.Reader
	io.Closer
}

// request builds a v1 command request the way httppeer.makev1commandrequest does.
func (o *Origin) request(ctx context.Context, cmd string, caps Caps, args url.Values, compressible bool) (*http.Request, error) {
	u, err := url.Parse(o.URL)
	if err != nil {
		return nil, fmt.Errorf("origin URL %q: %w", o.URL, err)
	}
	q := url.Values{"cmd": {cmd}}
	header := http.Header{}
	for k, vs := range o.Header {
		header[k] = append([]string(nil), vs...)
	}
	ua := o.UserAgent
	if ua == "" {
		ua = "mercurial/proto-1.0 (Detour)"
	}
	header.Set("User-Agent", ua)
	header.Set("Accept", "application/mercurial-0.1")
	limit := caps.HTTPHeaderLimit()
	var vary []string
	if len(args) > 0 {
		if limit > 0 {
			for i, v := range splitHeaderValue(args.Encode(), "X-HgArg", limit) {
				name := fmt.Sprintf("X-HgArg-%d", i+1)
				header.Set(name, v)
				vary = append(vary, name)
			}
		} else {
			for k, vs := range args {
				q[k] = vs
			}
		}
	}
	if caps != nil {
		// The protocol parameters httppeer sends once it knows the capabilities, without
		// partial-pull: that would let an origin with server.pullbundle answer with a
		// pre-built bundle that covers only part of what was asked.
		params := []string{"0.1"}
		if mt, _ := caps.Value("httpmediatype"); strings.Contains(mt, "0.2tx") {
			params = append(params, "0.2")
			if compressible && caps.Has("compression") {
				comps := o.WireCompression
				if len(comps) == 0 {
					comps = DefaultWireCompression
				}
				params = append(params, "comp="+strings.Join(comps, ","))
			}
		}
		sort.Strings(params)
		if limit == 0 {
			limit = 1024
		}
		for i, v := range splitHeaderValue(strings.Join(params, " "), "X-HgProto", limit) {
			name := fmt.Sprintf("X-HgProto-%d", i+1)
			header.Set(name, v)
			vary = append(vary, name)
		}
	}
	if len(vary) > 0 {
		sort.Strings(vary)
		header.Set("Vary", strings.Join(vary, ","))
	}
	u.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	req.Header = header
	return req, nil
}

// splitHeaderValue cuts value into pieces that fit headers named name-N of at most limit bytes
// per line (httppeer.encodevalueinheaders).
func splitHeaderValue(value, name string, limit int) []string {
	n := limit - len(name+"-000") - len(": \r\n")
	if n < 1 {
		n = 1
	}
	var out []string
	for len(value) > n {
		out = append(out, value[:n])
		value = value[n:]
	}
	return append(out, value)
}

// callBytes runs a command whose answer is plain bytes (capabilities, heads, clonebundles).
func (o *Origin) callBytes(ctx context.Context, cmd string, caps Caps, args url.Values) ([]byte, error) {
	body, err := o.call(ctx, cmd, caps, args, false)
	if err != nil {
		return nil, err
	}
	defer body.Close()
	b, err := io.ReadAll(io.LimitReader(body, 16<<20))
	if err != nil {
		return nil, fmt.Errorf("origin %s: %w", cmd, err)
	}
	return b, nil
}

// callStream runs a command whose answer is a (possibly compressed) stream, decoded.
func (o *Origin) callStream(ctx context.Context, cmd string, caps Caps, args url.Values) (io.ReadCloser, error) {
	return o.call(ctx, cmd, caps, args, true)
}

func (o *Origin) call(ctx context.Context, cmd string, caps Caps, args url.Values, compressible bool) (io.ReadCloser, error) {
	req, err := o.request(ctx, cmd, caps, args, compressible)
	if err != nil {
		return nil, err
	}
	resp, err := o.client().Do(req)
	if err != nil {
		return nil, fmt.Errorf("origin %s: %w", cmd, err)
	}
	body, err := decodeResponse(resp, compressible)
	if err != nil {
		resp.Body.Close()
		return nil, fmt.Errorf("origin %s: %w", cmd, err)
	}
	return body, nil
}

// decodeResponse checks a v1 answer's status and media type and undoes its transport
// compression (httppeer.parsev1commandresponse).
func decodeResponse(resp *http.Response, compressible bool) (io.ReadCloser, error) {
	ct := resp.Header.Get("Content-Type")
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("HTTP %s (%s): %q", resp.Status, ct, strings.TrimSpace(string(msg)))
	}
	if strings.HasPrefix(ct, "application/hg-error") {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return nil, fmt.Errorf("%w: %s", ErrOriginAbort, strings.TrimSpace(string(msg)))
	}
	switch {
	case strings.HasPrefix(ct, "application/mercurial-0.1"):
		if !compressible {
			return resp.Body, nil
		}
		z, err := zlib.NewReader(resp.Body)
		if err != nil {
			return nil, fmt.Errorf("zlib answer: %w", err)
		}
		return readCloser{z, multiCloser{z, resp.Body}}, nil
	case strings.HasPrefix(ct, "application/mercurial-0.2"):
		br := bufio.NewReader(resp.Body)
		n, err := br.ReadByte()
		if err != nil {
			return nil, fmt.Errorf("0.2 answer without a compression name: %w", err)
		}
		name := make([]byte, n)
		if _, err := io.ReadFull(br, name); err != nil {
			return nil, fmt.Errorf("0.2 answer: compression name truncated: %w", err)
		}
		switch string(name) {
		case "none":
			return readCloser{br, resp.Body}, nil
		case "zlib":
			z, err := zlib.NewReader(br)
			if err != nil {
				return nil, fmt.Errorf("zlib answer: %w", err)
			}
			return readCloser{z, multiCloser{z, resp.Body}}, nil
		case "zstd":
			z, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
			if err != nil {
				return nil, fmt.Errorf("zstd answer: %w", err)
			}
			return readCloser{z, multiCloser{zstdCloser{z}, resp.Body}}, nil
		}
		return nil, fmt.Errorf("0.2 answer in compression %q, which was not offered", name)
	}
	return nil, fmt.Errorf("not a Mercurial answer (Content-Type %q)", ct)
}

type zstdCloser struct{ d *zstd.Decoder }

func (z zstdCloser) Close() error { z.d.Close(); return nil }

type multiCloser []io.Closer

func (m multiCloser) Close() error {
	var errs []error
	for _, c := range m {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// ErrUnknownRevision is Lookup's answer for a key the origin does not resolve.
var ErrUnknownRevision = errors.New("origin does not know the revision")

// Lookup resolves key (a revision number, a node, a symbol) to a node on the origin, as `hg
// lookup` over the wire does. A key the origin does not resolve (a revision number past the tip,
// a filtered revision) is ErrUnknownRevision.
func (o *Origin) Lookup(ctx context.Context, caps Caps, key string) (Node, error) {
	body, err := o.callBytes(ctx, "lookup", caps, url.Values{"key": {key}})
	if err != nil {
		return Node{}, err
	}
	ok, rest, _ := strings.Cut(strings.TrimSpace(string(body)), " ")
	if ok != "1" {
		return Node{}, fmt.Errorf("lookup %q: %w: %s", key, ErrUnknownRevision, rest)
	}
	return ParseNode(rest)
}
