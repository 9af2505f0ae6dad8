package hgweb

import (
	"net/http"
	"testing"

	"github.com/detourhq/detour/internal/agent"
)

// Only a Mercurial answer allows; the origin's refusals (including a redirect to a login page)
// deny; what says "not now" or is not Mercurial's is an error, which is not cached.
func TestOriginAnswersAreClassifiedFailingClosed(t *testing.T) {
	cases := []struct {
		name string
		code int
		ct   string
		want agent.AccessAnswer
	}{
		{"v1 capabilities", 200, "application/mercurial-0.1", agent.AccessAllowed},
		{"v2 handshake", 200, "application/mercurial-cbor", agent.AccessAllowed},
		{"login page served with 200", 200, "text/html; charset=utf-8", agent.AccessError},
		{"no content type", 200, "", agent.AccessError},
		{"other success", 204, "application/mercurial-0.1", agent.AccessError},
		{"redirect to a login page", 302, "text/html", agent.AccessDenied},
		{"unauthorized", 401, "text/plain", agent.AccessDenied},
		{"forbidden", 403, "text/plain", agent.AccessDenied},
		{"no such repository", 404, "text/plain", agent.AccessDenied},
		{"request timeout", 408, "text/plain", agent.AccessError},
		{"rate limited", 429, "text/plain", agent.AccessError},
		{"origin failing", 500, "text/plain", agent.AccessError},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := classify(&http.Response{StatusCode: c.code, Header: http.Header{"Content-Type": {c.ct}}})
			if got != c.want || (got == agent.AccessError) != (err != nil) {
				t.Fatalf("classify = %v, %v; want %v", got, err, c.want)
			}
		})
	}
}
