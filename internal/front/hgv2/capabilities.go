package hgv2

import (
	"bytes"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/wire"
)

// maxHandshakeBytes bounds the capabilities body the front buffers to rewrite.
const maxHandshakeBytes = 4 << 20

// advertisement is the redirect section for one target set.
type advertisement struct {
	targets *agent.TargetSet
	section *wire.RedirectSection
}

// Section is the redirect section advertised now: the core's target set in its order (nil before
// the first target set arrived).
func (f *Front) Section() *wire.RedirectSection {
	ts := f.a.Targets()
	if ts == nil {
		return nil
	}
	if ad := f.section.Load(); ad != nil && ad.targets == ts {
		return ad.section
	}
	s := &wire.RedirectSection{Hashes: wire.DefaultHashes}
	for _, t := range ts.Live {
		rt := wire.RedirectTarget{Name: t.Name, Protocol: t.Protocol, URIs: t.Uris, TLSVersions: t.TlsVersions}
		if t.SniRequired {
			rt.SNIRequired = &t.SniRequired
		}
		s.Targets = append(s.Targets, rt)
	}
	f.section.Store(&advertisement{targets: ts, section: s})
	return s
}

// serveHandshake forwards `GET ?cmd=capabilities` and, when the origin answers with the v2 CBOR
// handshake, replaces the redirect section with the live target set and sets the batch sizes of
// manifestdata and filesdata (see batch.go).
func (f *Front) serveHandshake(w http.ResponseWriter, r *http.Request) {
	f.a.Count("capabilities")
	w = f.a.OriginWriter(w, "capabilities")
	req, err := http.NewRequestWithContext(r.Context(), r.Method, f.a.OriginURL(r), nil)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	req.Header = r.Header.Clone()
	resp, err := f.a.OriginClient().Do(req)
	if err != nil {
		f.a.OriginFailed(err)
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
	repo := strings.TrimSuffix(r.URL.Path, "/")
	out, err := wire.RewriteHandshakeV2(body, func(v2 []byte) ([]byte, error) { return f.rewriteCapabilities(r, repo, v2) })
	if err != nil {
		// The origin's map is not what we understand: pass it on untouched.
		f.a.Once().Warn("handshake", "cannot rewrite the origin's capabilities; passing them through", "err", err)
		out = body
	}
	resp.Body = io.NopCloser(bytes.NewReader(out))
	resp.Header.Set("Content-Length", strconv.Itoa(len(out)))
	copyResponse(w, resp)
}

// rewriteCapabilities is what the front changes in the origin's v2 capabilities map of repo: the
// redirect section, and the batch sizes.
func (f *Front) rewriteCapabilities(r *http.Request, repo string, caps []byte) ([]byte, error) {
	out, err := wire.RewriteRedirect(caps, f.Section())
	if err != nil {
		return nil, err
	}
	b := f.batchSize(r, repo)
	if b == 0 {
		return out, nil
	}
	sizes := make(map[string]uint64, len(batchedCommands))
	for _, c := range batchedCommands {
		sizes[c] = b
	}
	f.batchSizes.WithLabelValues("rewritten").Inc()
	return wire.RewriteBatchSizes(out, sizes)
}

// serveCapabilitiesCommand answers the v2 `capabilities` command: the origin's answer rewritten
// as in the handshake.
func (f *Front) serveCapabilitiesCommand(w http.ResponseWriter, r *http.Request, cmd *wire.CommandRequest, encodings []string) {
	f.a.Count("capabilities")
	w = f.a.OriginWriter(w, "capabilities")
	resp, err := f.forwardCommand(r, cmd, wire.UpstreamEncodings(encodings))
	if err != nil {
		f.originFailed(w, cmd, err)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		copyResponse(w, resp)
		return
	}
	rr, err := wire.ReadResponse(io.LimitReader(resp.Body, maxHandshakeBytes), cmd.RequestID, wire.ReaderOptions{MaxPayload: wire.MaxPayloadLimit})
	if err != nil || rr.Status().Status != wire.StatusOK {
		protocolError(w, cmd.RequestID, "origin capabilities response unreadable")
		return
	}
	caps, err := io.ReadAll(rr)
	if err != nil {
		protocolError(w, cmd.RequestID, "origin capabilities response unreadable")
		return
	}
	out, err := f.rewriteCapabilities(r, repoOf(r.URL.Path), caps)
	if err != nil {
		f.a.Once().Warn("handshake", "cannot rewrite the origin's capabilities; passing them through", "err", err)
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
