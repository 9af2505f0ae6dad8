package e2e

import (
	"bytes"
	"net/http"
	"testing"

	"github.com/detourhq/detour/internal/testbed"
)

// The rigs' authenticating proxy relays the whole of a streamed answer to a command even when its
// transport's last read of the command's body comes after the answer has started (as it did on a
// loaded CI machine, where the cut answer left a real Mercurial client waiting forever).
func TestAuthProxyRelaysTheWholeAnswerWhenTheBodyIsReadLate(t *testing.T) {
	late := testbed.NewLateBodyRead(t)
	p := newAuthProxy(t, late.Upstream.URL, map[string]string{"alice": "s3cret"})
	p.proxy.Transport = late.Transport
	req, err := http.NewRequest(http.MethodPost, p.URL+"api/exp-http-v2-0003/ro/filesdata", bytes.NewReader(bytes.Repeat([]byte("x"), 2<<10)))
	if err != nil {
		t.Fatal(err)
	}
	req.SetBasicAuth("alice", "s3cret")
	late.Check(t, req)
}
