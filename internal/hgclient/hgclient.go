// Package hgclient is a small wire-protocol-v2 client over HTTP that behaves like a
// redirect-capable Mercurial client: it reads the capabilities handshake, sends commands with the
// targets it accepts, follows redirects and checks what it fetched against the location's size and
// hashes. Tests and `detourctl probe` use it.
package hgclient

import (
	"bytes"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/detourhq/detour/internal/wire"
)

// Client talks to one repository URL.
type Client struct {
	Base string // repository URL, e.g. http://127.0.0.1:8080/
	HTTP *http.Client
	// Header is added to every request to Base (credentials, say), never to a location fetch:
	// a location is another server, which must not receive the repository's credentials.
	Header http.Header
}

// Handshake is the decoded v1 capabilities handshake.
type Handshake struct {
	APIBase  string
	Redirect *wire.RedirectSection // nil when the server advertises none
}

func (c *Client) http() *http.Client {
	if c.HTTP != nil {
		return c.HTTP
	}
	return http.DefaultClient
}

func (c *Client) url(p string) string { return strings.TrimSuffix(c.Base, "/") + "/" + p }

func (c *Client) addHeader(req *http.Request) {
	for k, vs := range c.Header {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
}

// Capabilities performs the v2 upgrade handshake.
func (c *Client) Capabilities(ctx context.Context) (*Handshake, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url("?cmd=capabilities"), nil)
	if err != nil {
		return nil, err
	}
	c.addHeader(req)
	req.Header.Set("X-HgUpgrade-1", wire.APIVersion)
	req.Header.Set("X-HgProto-1", "cbor")
	resp, err := c.http().Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != wire.MediaTypeCBOR {
		return nil, fmt.Errorf("capabilities: HTTP %d %s: the server does not speak protocol v2", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var hs struct {
		APIBase string                     `cbor:"apibase"`
		APIs    map[string]wire.RawMessage `cbor:"apis"`
	}
	if err := wire.Unmarshal(body, &hs); err != nil {
		return nil, fmt.Errorf("capabilities: %w", err)
	}
	v2, ok := hs.APIs[wire.APIVersion]
	if !ok {
		return nil, fmt.Errorf("capabilities: no %s API", wire.APIVersion)
	}
	section, err := wire.ReadRedirect(v2)
	if err != nil {
		return nil, err
	}
	return &Handshake{APIBase: hs.APIBase, Redirect: section}, nil
}

// Accepted returns the targets a client with support for the given protocols accepts, in the
// server's order (as Mercurial's client filters them).
func Accepted(s *wire.RedirectSection, protocols ...string) []string {
	if s == nil {
		return nil
	}
	var out []string
	for _, t := range s.Targets {
		for _, p := range protocols {
			if t.Protocol == p {
				out = append(out, t.Name)
				break
			}
		}
	}
	return out
}

// Result is what one command produced.
type Result struct {
	Status     *wire.Status
	Redirected bool
	Objects    []byte        // the command's CBOR objects (inline, or fetched from the location)
	Elapsed    time.Duration // the whole exchange, including any fetch
	Fetch      time.Duration // the location fetch alone
	Verified   []string      // hash algorithms checked against the fetched bytes
	Header     http.Header   // the command response's headers
}

// ErrVerify means fetched bytes did not match the location's size or hashes.
var ErrVerify = errors.New("fetched object does not match the location")

// Command sends one command and follows a redirect. redirect nil means the client does not
// support redirects.
func (c *Client) Command(ctx context.Context, name string, args map[string]any, redirect *wire.RedirectRequest) (*Result, error) {
	return c.command(ctx, name, args, redirect, true)
}

// CommandNoFollow sends one command and returns a redirect's location without fetching it.
func (c *Client) CommandNoFollow(ctx context.Context, name string, args map[string]any, redirect *wire.RedirectRequest) (*Result, error) {
	return c.command(ctx, name, args, redirect, false)
}

// CommandRequest is the HTTP request Command sends for one command (request ID 1), for a caller
// that reads the answer itself.
func (c *Client) CommandRequest(ctx context.Context, name string, args map[string]any, redirect *wire.RedirectRequest) (*http.Request, error) {
	var buf bytes.Buffer
	rw := wire.NewRequestWriter(&buf)
	if err := rw.WriteSettings(wire.EncodingIdentity); err != nil {
		return nil, err
	}
	if err := rw.WriteCommand(&wire.CommandRequest{RequestID: 1, Name: name, Args: args, Redirect: redirect}); err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url("api/"+wire.APIVersion+"/ro/"+name), &buf)
	if err != nil {
		return nil, err
	}
	c.addHeader(req)
	req.Header.Set("Content-Type", wire.MediaTypeFraming)
	req.Header.Set("Accept", wire.MediaTypeFraming)
	return req, nil
}

func (c *Client) command(ctx context.Context, name string, args map[string]any, redirect *wire.RedirectRequest, follow bool) (*Result, error) {
	start := time.Now()
	req, err := c.CommandRequest(ctx, name, args, redirect)
	if err != nil {
		return nil, err
	}
	resp, err := c.http().Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return nil, fmt.Errorf("%s: HTTP %d: %s", name, resp.StatusCode, bytes.TrimSpace(b))
	}
	r, err := wire.ReadResponse(resp.Body, 1, wire.ReaderOptions{MaxPayload: wire.MaxPayloadLimit})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	res := &Result{Status: r.Status(), Header: resp.Header}
	switch r.Status().Status {
	case wire.StatusOK:
		if res.Objects, err = io.ReadAll(r); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
	case wire.StatusRedirect:
		if redirect == nil {
			return nil, fmt.Errorf("%s: server redirected a client that sent no redirect map", name)
		}
		res.Redirected = true
		if err := r.CheckRedirectEnds(); err != nil {
			return nil, fmt.Errorf("%s: protocol error: %w", name, err)
		}
		if !follow {
			break
		}
		fetchStart := time.Now()
		if res.Objects, res.Verified, err = c.fetch(ctx, r.Status().Location); err != nil {
			return res, fmt.Errorf("%s: %w", name, err)
		}
		res.Fetch = time.Since(fetchStart)
	case wire.StatusError:
		return res, fmt.Errorf("%s: command error: %s", name, r.Status().Error.Message)
	default:
		return nil, fmt.Errorf("%s: unknown status %q", name, r.Status().Status)
	}
	res.Elapsed = time.Since(start)
	return res, nil
}

// fetch GETs a location as Mercurial's client does and verifies size and every full hash.
func (c *Client) fetch(ctx context.Context, loc *wire.Location) ([]byte, []string, error) {
	if loc == nil || loc.URL == "" {
		return nil, nil, errors.New("redirect without a location url")
	}
	if loc.MediaType != wire.MediaTypeCBOR {
		return nil, nil, fmt.Errorf("location media type %q is not %s", loc.MediaType, wire.MediaTypeCBOR)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, loc.URL, nil)
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("Accept", loc.MediaType)
	resp, err := c.http().Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("GET %s: HTTP %d", loc.URL, resp.StatusCode)
	}
	body, err := readChunked(resp.Body)
	if err != nil {
		return nil, nil, err
	}
	if loc.Size != nil && uint64(len(body)) != *loc.Size {
		return body, nil, fmt.Errorf("%w: %d bytes, location says %d", ErrVerify, len(body), *loc.Size)
	}
	var verified []string
	for _, h := range loc.FullHashes {
		if len(h) != 2 {
			continue
		}
		var hh hash.Hash
		switch h[0] {
		case "sha256":
			hh = sha256.New()
		case "sha1":
			hh = sha1.New()
		default:
			continue
		}
		hh.Write([]byte(loc.FullHashSeed))
		hh.Write(body)
		if !bytes.Equal(hh.Sum(nil), []byte(h[1])) {
			return body, verified, fmt.Errorf("%w: %s differs", ErrVerify, h[0])
		}
		verified = append(verified, h[0])
	}
	return body, verified, nil
}

// locationChunk is how much of a location's body Mercurial's client reads at a time.
const locationChunk = 32 << 10

// readChunked reads a location's body as Mercurial's client does, 32 KiB per read.
func readChunked(r io.Reader) ([]byte, error) {
	var out bytes.Buffer
	buf := make([]byte, locationChunk)
	for {
		n, err := r.Read(buf)
		out.Write(buf[:n])
		if err == io.EOF {
			return out.Bytes(), nil
		}
		if err != nil {
			return out.Bytes(), err
		}
	}
}
