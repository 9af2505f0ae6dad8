package hgv2

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/wire"
)

// serveCommand handles POST .../api/exp-http-v2-0003/ro/<name>: it reads the request, and for a
// cacheable command from a client that accepts redirects asks the core where the response comes
// from; everything else goes to next (the origin) as it is.
func (f *Front) serveCommand(w http.ResponseWriter, r *http.Request, name string, next http.Handler) {
	if r.Header.Get("Content-Type") != wire.MediaTypeFraming {
		// Not a framed request: the origin answers it (415), exactly as without Detour.
		next.ServeHTTP(w, r)
		return
	}
	body, rs, ok := f.readCommand(w, r, name)
	if !ok {
		return
	}
	var cmd *wire.CommandRequest
	var encodings []string
	if rs != nil {
		cmd, encodings = rs.Commands[0], rs.ContentEncodings
	}
	if cmd != nil && cmd.Name == name && name == "capabilities" {
		f.serveCapabilitiesCommand(w, r, cmd, encodings)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	q, ok := f.query(r, name, cmd)
	if !ok {
		if cmd != nil && cmd.Name == name && name == "changesetdata" && f.cfg.BatchSize == 0 && fullDAG(cmd) {
			f.relayObservingSize(w, r, cmd, encodings)
			return
		}
		f.a.RelayAs(w, r, "passthrough", commandLabel(name))
		return
	}
	w.Header().Set(agent.HeaderContentKey, q.Key)
	w.Header().Set(agent.HeaderRegion, f.a.Region())

	d := f.a.Decide(r, q)
	switch d.Outcome {
	case agent.Redirect:
		answer, err := f.redirectAnswer(cmd.Redirect.Hashes, d.Location)
		if err == nil {
			// Counted before the answer goes out, so that a client that has it finds it counted.
			f.a.Count(d.Label())
			f.a.CountBytes(q.Command, agent.BytesStore, int64(d.Location.Size))
			writeRedirect(w, cmd.RequestID, answer)
			return
		}
		f.a.Once().Warn("redirect", "cannot encode a redirect; answering inline", "err", err)
		f.a.RelayAs(w, r, "inline", q.Command)
		return
	case agent.Fill:
		f.a.Count(d.Label())
		f.relayWithFill(w, r, cmd, encodings, d.Fill)
		return
	}
	f.a.RelayAs(w, r, d.Label(), q.Command)
}

// v2Commands are the protocol's commands (Mercurial 4.8 to 5.9), which label metrics as they are;
// any other name is "other" (a client chooses the path).
var v2Commands = map[string]bool{"branchmap": true, "capabilities": true, "changesetdata": true, "filedata": true,
	"filesdata": true, "heads": true, "known": true, "listkeys": true, "lookup": true, "manifestdata": true,
	"pushkey": true, "rawstorefiledata": true}

func commandLabel(name string) string {
	if v2Commands[name] {
		return name
	}
	return agent.OtherCommand
}

// readCommand reads and parses a command request body. It answers the client itself when the body
// is unreadable or malformed (ok false); a request it cannot read but the origin may (an encoded
// request stream, several commands) comes back with rs nil, to be passed through. A request
// stream it returns holds exactly one command.
func (f *Front) readCommand(w http.ResponseWriter, r *http.Request, name string) (body []byte, rs *wire.RequestStream, ok bool) {
	// A command body is small: a client that trickles it is cut off, not waited for.
	_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(f.cfg.CommandBodyTimeout))
	body, err := io.ReadAll(io.LimitReader(r.Body, f.cfg.MaxRequestBytes+1))
	if err != nil {
		f.a.Count("rejected")
		http.Error(w, "detour agent: cannot read the command request body: "+err.Error(), http.StatusBadRequest)
		return nil, nil, false
	}
	_ = http.NewResponseController(w).SetReadDeadline(time.Time{})
	if int64(len(body)) > f.cfg.MaxRequestBytes {
		f.a.Count("protocol_error")
		protocolError(w, 0, fmt.Sprintf("request exceeds %d bytes", f.cfg.MaxRequestBytes))
		return nil, nil, false
	}
	rs, err = wire.ReadRequest(bytes.NewReader(body), wire.ReaderOptions{MaxTotal: f.cfg.MaxRequestBytes})
	switch {
	case errors.Is(err, wire.ErrUnsupportedEncoding):
		// A request stream encoded in a way the front cannot read may still be one the origin
		// reads: let it answer, inline.
		return body, nil, true
	case err != nil:
		f.a.Count("protocol_error")
		f.a.Log().Debug("malformed command request", "command", name, "remote", r.RemoteAddr, "err", err)
		protocolError(w, firstRequestID(body), "malformed request: "+err.Error())
		return nil, nil, false
	case len(rs.Commands) != 1:
		return body, nil, true
	}
	return body, rs, true
}

// query says whether cmd's response may come from the core, and with what key. Only a cacheable
// command from a client that sent a redirect map naming targets may be redirected (a client that
// sent none must never get a redirect), and only when its arguments name content.
func (f *Front) query(r *http.Request, name string, cmd *wire.CommandRequest) (agent.Query, bool) {
	if cmd == nil || cmd.Name != name || !f.cacheable[cmd.Name] || cmd.Redirect == nil || len(cmd.Redirect.Targets) == 0 || !f.a.Redirecting() {
		return agent.Query{}, false
	}
	if ok, why := Cacheability(cmd); !ok {
		f.uncacheable.WithLabelValues(cmd.Name, why).Inc()
		return agent.Query{}, false
	}
	repo := repoOf(r.URL.Path)
	key, err := ContentKeyAt(f.cfg.RepoID, repo, cmd)
	if err != nil {
		return agent.Query{}, false
	}
	return agent.Query{Key: key, Command: cmd.Name, Repo: repo, Accepted: cmd.Redirect.Targets, MediaType: wire.MediaTypeCBOR,
		Transient: TransientBatch(cmd, f.advertisedBatchSize(repo))}, true
}

// firstRequestID reads the request id of the first frame, for answering a malformed request.
func firstRequestID(body []byte) uint16 {
	if h, err := wire.ParseHeader(body); err == nil {
		return h.RequestID
	}
	return 0
}

func protocolError(w http.ResponseWriter, requestID uint16, msg string) {
	w.Header().Set("Content-Type", wire.MediaTypeFraming)
	w.WriteHeader(http.StatusOK)
	_ = wire.NewResponseWriter(w, wire.DefaultMaxPayload).WriteErrorFrame(requestID, "protocol", msg)
}

func (f *Front) originFailed(w http.ResponseWriter, cmd *wire.CommandRequest, err error) {
	f.a.OriginFailed(err)
	w.Header().Set("Content-Type", wire.MediaTypeFraming)
	w.WriteHeader(http.StatusOK)
	_ = wire.NewResponseWriter(w, wire.DefaultMaxPayload).WriteErrorFrame(cmd.RequestID, "server", "origin unreachable")
}

// forwardCommand sends cmd to the origin, re-encoded with encodings as the content encodings the
// client accepts (those the front can read the response in).
func (f *Front) forwardCommand(r *http.Request, cmd *wire.CommandRequest, encodings []string) (*http.Response, error) {
	var buf bytes.Buffer
	rw := wire.NewRequestWriter(&buf)
	if err := rw.WriteSettings(encodings...); err != nil {
		return nil, err
	}
	if err := rw.WriteCommand(cmd); err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(r.Context(), http.MethodPost, f.a.OriginURL(r), &buf)
	if err != nil {
		return nil, err
	}
	req.Header = r.Header.Clone()
	req.Header.Del("Content-Length")
	req.ContentLength = int64(buf.Len())
	return f.a.OriginClient().Do(req)
}

// prepared is a location's redirect answer, encoded for a list of hash algorithms (the digests a
// location carries depend on what the client asked for), kept with the location (Location.Memo).
type prepared struct {
	hashes []string
	answer *wire.PreparedRedirect
}

// redirectAnswer returns the redirect response for loc with the digests of the hash algorithms
// the client asked for, in its order: the one kept with the location when it was encoded for the
// same list, else a new one.
func (f *Front) redirectAnswer(hashes []string, loc *agent.Location) (*wire.PreparedRedirect, error) {
	if p, ok := loc.Memo().(*prepared); ok && slices.Equal(p.hashes, hashes) {
		return p.answer, nil
	}
	size := loc.Size
	wl := &wire.Location{URL: loc.URL, MediaType: loc.MediaType, Size: &size}
	for _, h := range hashes {
		switch h {
		case "sha256":
			wl.FullHashes = append(wl.FullHashes, []string{h, string(loc.SHA256)})
		case "sha1":
			wl.FullHashes = append(wl.FullHashes, []string{h, string(loc.SHA1)})
		}
	}
	answer, err := wire.PrepareRedirect(wl, wire.DefaultMaxPayload)
	if err != nil {
		return nil, err
	}
	if loc.Memo() == nil {
		loc.SetMemo(&prepared{hashes: slices.Clone(hashes), answer: answer})
	}
	return answer, nil
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
