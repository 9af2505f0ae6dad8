package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/status"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/wire"
)

// Headers on the answers to cacheable commands: the request's content key and the agent's region.
const (
	HeaderContentKey = "Detour-Content-Key"
	HeaderRegion     = "Detour-Agent-Region"
)

// serveCommand handles POST .../api/exp-http-v2-0003/ro/<name>.
func (a *Agent) serveCommand(w http.ResponseWriter, r *http.Request, name string) {
	if r.Header.Get("Content-Type") != wire.MediaTypeFraming {
		// Not a framed request: the origin answers it (415), exactly as without Detour.
		a.metrics.requests.WithLabelValues("passthrough").Inc()
		a.proxy.ServeHTTP(w, recordBodyErr(r))
		return
	}
	// A command body is small: a client that trickles it is cut off, not waited for.
	_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(a.cfg.CommandBodyTimeout))
	body, err := io.ReadAll(io.LimitReader(r.Body, a.cfg.MaxRequestBytes+1))
	if err != nil {
		a.metrics.requests.WithLabelValues("rejected").Inc()
		http.Error(w, "detour agent: cannot read the command request body: "+err.Error(), http.StatusBadRequest)
		return
	}
	_ = http.NewResponseController(w).SetReadDeadline(time.Time{})
	if int64(len(body)) > a.cfg.MaxRequestBytes {
		a.metrics.requests.WithLabelValues("protocol_error").Inc()
		a.protocolError(w, 0, fmt.Sprintf("request exceeds %d bytes", a.cfg.MaxRequestBytes))
		return
	}
	rs, err := wire.ReadRequest(bytes.NewReader(body), wire.ReaderOptions{MaxTotal: a.cfg.MaxRequestBytes})
	if errors.Is(err, wire.ErrUnsupportedEncoding) {
		// A request stream encoded in a way the agent cannot read may still be one the origin
		// reads: let it answer, inline.
		a.passthrough(w, r, body, "passthrough")
		return
	}
	if err != nil {
		a.metrics.requests.WithLabelValues("protocol_error").Inc()
		a.log.Debug("malformed command request", "command", name, "remote", r.RemoteAddr, "err", err)
		a.protocolError(w, firstRequestID(body), "malformed request: "+err.Error())
		return
	}
	if len(rs.Commands) != 1 || rs.Commands[0].Name != name {
		a.passthrough(w, r, body, "passthrough")
		return
	}
	cmd := rs.Commands[0]
	switch {
	case name == "capabilities":
		a.metrics.requests.WithLabelValues("capabilities").Inc()
		a.serveCapabilitiesCommand(w, r, cmd)
		return
	case !a.cacheable[name], cmd.Redirect == nil, len(cmd.Redirect.Targets) == 0, a.placement == nil:
		a.passthrough(w, r, body, "passthrough")
		return
	}
	if ok, why := Cacheability(cmd); !ok {
		a.metrics.uncacheable.WithLabelValues(name, why).Inc()
		a.passthrough(w, r, body, "passthrough")
		return
	}
	repo := repoOf(r.URL.Path)
	key, err := ContentKeyAt(a.cfg.RepoID, repo, cmd)
	if err != nil {
		a.passthrough(w, r, body, "inline")
		return
	}
	// What `detourctl probe --explain` asks the control plane about (the key is no secret: every
	// redirect's URL names it).
	w.Header().Set(HeaderContentKey, key)
	w.Header().Set(HeaderRegion, a.cfg.Region)
	// Only a client the origin would serve gets a redirect (DESIGN invariant 9), from the cache
	// too; any other goes to the origin as it is and gets the origin's own answer (a 401 it can
	// authenticate after).
	ans, private := a.authorize(r, repo)
	switch ans {
	case authDenied:
		a.passthrough(w, r, body, "origin_denied")
		return
	case authError:
		a.passthrough(w, r, body, "inline")
		return
	}
	if hit, ok := a.cache.get(key, cmd.Redirect.Targets, time.Now()); ok {
		answer := hit.answer
		if !slices.Equal(hit.hashes, cmd.Redirect.Hashes) {
			answer, _ = redirectAnswer(cmd.Redirect.Hashes, hit.loc)
		}
		if answer != nil {
			writeRedirect(w, cmd.RequestID, answer)
			a.metrics.redirects.Inc()
			a.maybeCheckLocation(key, hit.target, hit.loc)
			return
		}
	}
	d := a.place(r.Context(), key, cmd, private)
	switch {
	case d == nil:
		a.passthrough(w, r, body, "inline")
	case d.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT && d.Location != nil:
		answer, err := redirectAnswer(cmd.Redirect.Hashes, d.Location)
		if err != nil {
			a.once.Warn("redirect", "cannot encode a redirect; answering inline", "err", err)
			a.passthrough(w, r, body, "inline")
			return
		}
		writeRedirect(w, cmd.RequestID, answer)
		a.metrics.redirects.Inc()
		a.cache.put(key, d, answer, cmd.Redirect.Hashes, time.Now())
		a.maybeCheckLocation(key, d.Target, d.Location)
	case d.Fill != nil && a.admitFill(d.Fill.Target):
		a.serveInlineWithFill(w, r, cmd, key, d.Fill)
	default:
		if d.Fill != nil {
			// Granted although the agent said it cannot fill (an older control plane), or the
			// budget filled up since it asked: release the claim, answer inline.
			a.metrics.fills.WithLabelValues("declined").Inc()
			a.abortFill(key, d.Fill.Token, "agent cannot fill now")
		}
		a.passthrough(w, r, body, "inline")
	}
}

// repoOf returns the repository part of a v2 command's path: what precedes /api/<version>/, as
// the client wrote it ("" for the origin's root). The client's own handshake went to that path
// with ?cmd=capabilities.
func repoOf(path string) string {
	if i := strings.Index(path, commandPathMarker); i >= 0 {
		return path[:i]
	}
	return ""
}

// firstRequestID reads the request id of the first frame, for answering a malformed request.
func firstRequestID(body []byte) uint16 {
	if h, err := wire.ParseHeader(body); err == nil {
		return h.RequestID
	}
	return 0
}

func (a *Agent) protocolError(w http.ResponseWriter, requestID uint16, msg string) {
	w.Header().Set("Content-Type", wire.MediaTypeFraming)
	w.WriteHeader(http.StatusOK)
	_ = wire.NewResponseWriter(w, wire.DefaultMaxPayload).WriteErrorFrame(requestID, "protocol", msg)
}

func (a *Agent) originFailed(w http.ResponseWriter, cmd *wire.CommandRequest, err error) {
	a.once.Warn("origin", "origin unreachable", "origin", a.cfg.Origin.String(), "err", err)
	w.Header().Set("Content-Type", wire.MediaTypeFraming)
	w.WriteHeader(http.StatusOK)
	_ = wire.NewResponseWriter(w, wire.DefaultMaxPayload).WriteErrorFrame(cmd.RequestID, "server", "origin unreachable")
}

// passthrough sends the client's request bytes to the origin and its answer back, unchanged.
func (a *Agent) passthrough(w http.ResponseWriter, r *http.Request, body []byte, outcome string) {
	a.metrics.requests.WithLabelValues(outcome).Inc()
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	a.proxy.ServeHTTP(w, r)
}

func (a *Agent) originURL(r *http.Request) string {
	u := *a.cfg.Origin
	u.Path = joinPath(u.Path, r.URL.Path)
	u.RawPath = ""
	u.RawQuery = r.URL.RawQuery
	return u.String()
}

func joinPath(base, p string) string {
	switch {
	case base == "" || base == "/":
		return p
	case base[len(base)-1] == '/' && len(p) > 0 && p[0] == '/':
		return base + p[1:]
	}
	return base + p
}

// forwardCommand sends cmd to the origin re-encoded with identity as the only content encoding, so
// that the agent can read the response it relays.
func (a *Agent) forwardCommand(r *http.Request, cmd *wire.CommandRequest) (*http.Response, error) {
	var buf bytes.Buffer
	rw := wire.NewRequestWriter(&buf)
	if err := rw.WriteSettings(wire.EncodingIdentity); err != nil {
		return nil, err
	}
	if err := rw.WriteCommand(cmd); err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(r.Context(), http.MethodPost, a.originURL(r), &buf)
	if err != nil {
		return nil, err
	}
	req.Header = r.Header.Clone()
	req.Header.Del("Content-Length")
	req.ContentLength = int64(buf.Len())
	return a.client.Do(req)
}

// redirectAnswer encodes the redirect response for l, with the digests of the hash algorithms the
// client asked for, in its order.
func redirectAnswer(hashes []string, l *pb.Location) (*wire.PreparedRedirect, error) {
	size := l.Size
	loc := &wire.Location{URL: l.Url, MediaType: l.MediaType, Size: &size}
	for _, h := range hashes {
		switch h {
		case "sha256":
			loc.FullHashes = append(loc.FullHashes, []string{h, string(l.Sha256)})
		case "sha1":
			loc.FullHashes = append(loc.FullHashes, []string{h, string(l.Sha1)})
		}
	}
	return wire.PrepareRedirect(loc, wire.DefaultMaxPayload)
}

var framingContentType = []string{wire.MediaTypeFraming}

// writeRedirect answers a request with a prepared redirect.
func writeRedirect(w http.ResponseWriter, requestID uint16, answer *wire.PreparedRedirect) {
	buf := answer.AppendTo(make([]byte, 0, answer.Len()), requestID)
	h := w.Header()
	h["Content-Type"] = framingContentType
	h["Content-Length"] = []string{strconv.Itoa(len(buf))}
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(buf)
}

// place asks the control plane, within the place timeout. nil means "answer inline": the control
// plane failed, or is known to be down and is being probed (see cpGate). originRequiresCredentials
// tells the control plane that the origin refuses this repository to anonymous clients.
func (a *Agent) place(ctx context.Context, key string, cmd *wire.CommandRequest, originRequiresCredentials bool) *pb.PlaceResponse {
	if a.cp.down.Load() {
		a.metrics.placeFailures.WithLabelValues("control_plane_down").Inc()
		return nil
	}
	now := time.Now()
	a.lastPlace.Store(now.UnixNano())
	ctx, cancel := context.WithTimeout(ctx, a.cfg.PlaceTimeout)
	defer cancel()
	canFill := a.canFill()
	resp, err := a.placement.Place(ctx, &pb.PlaceRequest{Key: key, Command: cmd.Name,
		AcceptedTargets: cmd.Redirect.Targets, Hashes: cmd.Redirect.Hashes, AgentRegion: a.cfg.Region, AgentId: a.cfg.AgentID,
		CanFill: &canFill, UnfillableTargets: a.breakers.unfillable(now), OriginRequiresCredentials: originRequiresCredentials})
	a.metrics.placeLatency.Observe(time.Since(now).Seconds())
	if err != nil {
		a.metrics.placeFailures.WithLabelValues(status.Code(err).String()).Inc()
		a.placeFailed(err)
		return nil
	}
	return resp
}
