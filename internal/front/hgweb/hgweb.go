// Package hgweb holds what every Mercurial front needs of hgweb, Mercurial's HTTP server, beyond
// its protocol: the origin access probe, and the repository a request addresses. It knows no
// wire protocol version and decides nothing.
package hgweb

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/detourhq/detour/internal/agent"
)

// AccessProbe is the origin access check for an hgweb origin (DESIGN invariant 9): `GET
// <repository>?cmd=capabilities` carrying the client's credential headers and nothing else.
// hgweb checks the same `pull` permission for that command as for every read (`allow-read`,
// `deny-read`, `allow-pull` and the permission hooks extensions add), and a web server that
// authenticates in front of hgweb protects that URL as it protects the rest of the repository.
// Without protocol-upgrade headers the origin answers the short v1 capabilities string, so a
// check costs the origin a permission check and a few hundred bytes.
func AccessProbe(origin *url.URL, transport http.RoundTripper) agent.AccessProbe {
	client := &http.Client{Transport: transport,
		// A redirect is the origin's answer (a login page elsewhere, typically), not something to
		// follow: following it could read a 200 from a page that serves everyone.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	return func(ctx context.Context, repo string, creds http.Header) (agent.AccessAnswer, error) {
		u := *origin
		u.Path, u.RawPath, u.RawQuery = agent.JoinPath(u.Path, checkPath(repo)), "", "cmd=capabilities"
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
		if err != nil {
			return agent.AccessError, fmt.Errorf("origin access check: %w", err)
		}
		// Only the credentials: an answer that depended on any other header would not be the
		// answer for every request with these credentials.
		req.Header = creds
		req.Header.Set("User-Agent", "detour-agent (origin access check)")
		resp, err := client.Do(req)
		if err != nil {
			return agent.AccessError, fmt.Errorf("origin access check %s: %w", u.Redacted(), err)
		}
		// Read (a bounded part of) the body before the context ends, so the connection is reused.
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxCheckBody))
		resp.Body.Close()
		return classify(resp)
	}
}

// maxCheckBody is how much of a check's answer is read so that its connection can be reused.
const maxCheckBody = 64 << 10

// classify reads the origin's answer: only a Mercurial answer allows; 3xx and 4xx are the
// origin's refusal, except the ones that mean "not now" (408, 429), which are errors like 5xx.
func classify(resp *http.Response) (agent.AccessAnswer, error) {
	code, ct := resp.StatusCode, resp.Header.Get("Content-Type")
	switch {
	case code == http.StatusOK && strings.HasPrefix(ct, "application/mercurial-"):
		return agent.AccessAllowed, nil
	case code == http.StatusRequestTimeout || code == http.StatusTooManyRequests:
	case code >= 300 && code < 500:
		return agent.AccessDenied, nil
	}
	return agent.AccessError, fmt.Errorf("origin access check: HTTP %d %q is not a Mercurial answer", code, ct)
}

// checkPath is the URL path of a repository's capabilities, where hgweb answers `?cmd=`.
func checkPath(repo string) string {
	if repo == "" {
		return "/"
	}
	return repo
}
