package agent

import (
	"bytes"
	"io"
	"net/http"
	"strconv"

	"github.com/detourhq/detour/internal/wire"
)

// maxHandshakeBytes bounds the capabilities body the agent buffers to rewrite.
const maxHandshakeBytes = 4 << 20

// serveHandshake forwards `GET ?cmd=capabilities` and, when the origin answers with the v2 CBOR
// handshake, replaces the redirect section with the live target set.
func (a *Agent) serveHandshake(w http.ResponseWriter, r *http.Request) {
	a.metrics.requests.WithLabelValues("capabilities").Inc()
	req, err := http.NewRequestWithContext(r.Context(), r.Method, a.originURL(r), nil)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	req.Header = r.Header.Clone()
	resp, err := a.client.Do(req)
	if err != nil {
		a.once.Warn("origin", "origin unreachable", "origin", a.cfg.Origin.String(), "err", err)
		http.Error(w, "origin unreachable", http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != wire.MediaTypeCBOR {
		copyResponse(w, resp)
		return
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxHandshakeBytes+1))
	if err != nil || len(body) > maxHandshakeBytes {
		http.Error(w, "origin capabilities unreadable or too large", http.StatusBadGateway)
		return
	}
	out, err := wire.RewriteHandshake(body, a.section.Load())
	if err != nil {
		// The origin's map is not what we understand: pass it on untouched.
		a.once.Warn("handshake", "cannot rewrite the origin's capabilities; passing them through", "err", err)
		out = body
	}
	resp.Body = io.NopCloser(bytes.NewReader(out))
	resp.Header.Set("Content-Length", strconv.Itoa(len(out)))
	copyResponse(w, resp)
}

// serveCapabilitiesCommand answers the v2 `capabilities` command: the origin's answer with the
// redirect section replaced.
func (a *Agent) serveCapabilitiesCommand(w http.ResponseWriter, r *http.Request, cmd *wire.CommandRequest) {
	resp, err := a.forwardCommand(r, cmd)
	if err != nil {
		a.originFailed(w, cmd, err)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		copyResponse(w, resp)
		return
	}
	rr, err := wire.ReadResponse(io.LimitReader(resp.Body, maxHandshakeBytes), cmd.RequestID, wire.ReaderOptions{MaxPayload: wire.MaxPayloadLimit})
	if err != nil || rr.Status().Status != wire.StatusOK {
		a.protocolError(w, cmd.RequestID, "origin capabilities response unreadable")
		return
	}
	caps, err := io.ReadAll(rr)
	if err != nil {
		a.protocolError(w, cmd.RequestID, "origin capabilities response unreadable")
		return
	}
	out, err := wire.RewriteRedirect(caps, a.section.Load())
	if err != nil {
		a.once.Warn("handshake", "cannot rewrite the origin's capabilities; passing them through", "err", err)
		out = caps
	}
	w.Header().Set("Content-Type", wire.MediaTypeFraming)
	w.WriteHeader(http.StatusOK)
	rw := wire.NewResponseWriter(w, wire.DefaultMaxPayload)
	_ = rw.WriteStreamSettings(cmd.RequestID, wire.EncodingIdentity)
	_ = rw.WriteValue(cmd.RequestID, wire.Status{Status: wire.StatusOK})
	_ = rw.WriteData(cmd.RequestID, out)
	_ = rw.WriteEOS(cmd.RequestID)
}

func copyResponse(w http.ResponseWriter, resp *http.Response) {
	for k, vs := range resp.Header {
		for _, v := range vs {
			w.Header().Add(k, v)
		}
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, resp.Body)
}
