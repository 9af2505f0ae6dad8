package gcsemu

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
)

// Object holds as GCS has them (https://cloud.google.com/storage/docs/object-holds): a temporary
// or event-based hold on an object keeps it from being deleted or replaced until the hold is
// released. fake-gcs-server accepts the fields in a PATCH and drops them, so this layer keeps
// them: it records the hold a PATCH sets or releases, adds temporaryHold and eventBasedHold to the
// object's metadata (GET, PATCH and list answers), and refuses with HTTP 403, as GCS does, a
// DELETE of a held generation, an upload over a held object and a copy or rewrite onto one. What
// it does not cover: the XML API and form uploads, compose, and bucket retention policies.

type objectID struct{ Bucket, Name string }

// holdState is an object's holds, for one generation: a hold ends with the generation it was
// set on.
type holdState struct {
	Generation int64 `json:"generation"`
	Temporary  bool  `json:"temporary,omitempty"`
	EventBased bool  `json:"event_based,omitempty"`
}

func (h holdState) held() bool { return h.Temporary || h.EventBased }

type holds struct {
	mu   sync.Mutex
	m    map[objectID]holdState
	file string // "" in memory
}

func newHolds(file string) *holds { return &holds{m: map[objectID]holdState{}, file: file} }

type savedHold struct {
	Bucket string `json:"bucket"`
	Name   string `json:"name"`
	holdState
}

func loadHolds(file string) (*holds, error) {
	h := newHolds(file)
	b, err := os.ReadFile(file)
	if os.IsNotExist(err) {
		return h, nil
	}
	if err != nil {
		return nil, fmt.Errorf("object holds: %w", err)
	}
	var saved []savedHold
	if err := json.Unmarshal(b, &saved); err != nil {
		return nil, fmt.Errorf("object holds %s: %w", file, err)
	}
	for _, s := range saved {
		h.m[objectID{s.Bucket, s.Name}] = s.holdState
	}
	return h, nil
}

// get returns the holds on generation gen of id.
func (h *holds) get(id objectID, gen int64) holdState {
	h.mu.Lock()
	defer h.mu.Unlock()
	if st, ok := h.m[id]; ok && st.Generation == gen {
		return st
	}
	return holdState{Generation: gen}
}

func (h *holds) set(id objectID, st holdState) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if st.held() {
		h.m[id] = st
	} else {
		delete(h.m, id)
	}
	h.save()
}

func (h *holds) drop(id objectID) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.m[id]; ok {
		delete(h.m, id)
		h.save()
	}
}

// save writes the holds to the file, whole (called with mu held; a few entries per object that is
// held, so small next to the objects themselves).
func (h *holds) save() {
	if h.file == "" {
		return
	}
	saved := make([]savedHold, 0, len(h.m))
	for id, st := range h.m {
		saved = append(saved, savedHold{Bucket: id.Bucket, Name: id.Name, holdState: st})
	}
	b, _ := json.Marshal(saved)
	tmp := h.file + ".tmp"
	if err := os.MkdirAll(filepath.Dir(h.file), 0o700); err == nil {
		if err := os.WriteFile(tmp, b, 0o600); err == nil {
			_ = os.Rename(tmp, h.file)
		}
	}
}

// currentGeneration is the live generation of an object (0: none).
func (s *Server) currentGeneration(id objectID) int64 {
	o, err := s.srv.GetObject(id.Bucket, id.Name)
	if err != nil {
		return 0
	}
	return o.Generation
}

// route is what a JSON API request addresses.
type route struct {
	kind   string // "object", "list", "upload", "copy", "notifications"; "" for the rest
	object objectID
}

// routeOf parses the JSON API paths the storage client uses (object names are path-escaped).
func routeOf(r *http.Request) route {
	p := r.URL.EscapedPath()
	if rest, ok := strings.CutPrefix(p, "/upload/storage/v1/b/"); ok {
		bucket, tail, _ := strings.Cut(rest, "/")
		if name := r.URL.Query().Get("name"); (tail == "o" || tail == "o/") && name != "" && r.Method == http.MethodPost {
			return route{kind: "upload", object: objectID{unescape(bucket), name}}
		}
		return route{}
	}
	rest, ok := strings.CutPrefix(p, "/storage/v1/b/")
	if !ok {
		return route{}
	}
	parts := strings.Split(rest, "/")
	switch {
	case len(parts) == 2 && parts[1] == "notificationConfigs":
		return route{kind: "notifications"}
	case len(parts) == 2 && parts[1] == "o", len(parts) == 3 && parts[1] == "o" && parts[2] == "":
		return route{kind: "list", object: objectID{Bucket: unescape(parts[0])}}
	case len(parts) == 3 && parts[1] == "o":
		return route{kind: "object", object: objectID{unescape(parts[0]), unescape(parts[2])}}
	case len(parts) == 7 && parts[1] == "o" && (parts[3] == "rewriteTo" || parts[3] == "copyTo") && parts[5] == "o":
		return route{kind: "copy", object: objectID{unescape(parts[4]), unescape(parts[6])}}
	}
	return route{}
}

func unescape(s string) string {
	u, err := url.PathUnescape(s)
	if err != nil {
		return s
	}
	return u
}

// handler adds holds and notifications to the emulator's handler.
func (s *Server) handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// fake-gcs-server patches an object's metadata map in place while a listing or a
		// metadata read may be encoding the same map (a data race the race detector reports):
		// metadata updates wait for those reads, and the reads for them.
		switch {
		case r.Method == http.MethodPatch || r.Method == http.MethodPut && !strings.Contains(r.URL.Path, "/upload/"):
			s.meta.Lock()
			defer s.meta.Unlock()
		case r.Method == http.MethodGet && r.URL.Query().Get("alt") != "media":
			s.meta.RLock()
			defer s.meta.RUnlock()
		}
		rt := routeOf(r)
		switch rt.kind {
		case "notifications":
			if r.Method == http.MethodPost {
				// fake-gcs-server publishes a notification through PUBSUB_EMULATOR_HOST only.
				if _, err := PubSub(); err != nil {
					writeError(w, http.StatusServiceUnavailable, "no Pub/Sub emulator for notifications: "+err.Error())
					return
				}
			}
		case "upload", "copy":
			// A precondition that fails is answered 412 first (an upload that must create the
			// object finds it there, whether it is held or not).
			cur := s.currentGeneration(rt.object)
			if g := r.URL.Query().Get("ifGenerationMatch"); g != "" && g != strconv.FormatInt(cur, 10) {
				break
			}
			if st := s.holds.get(rt.object, cur); cur != 0 && st.held() {
				writeHeld(w, rt.object, st)
				return
			}
		case "list":
			if r.Method == http.MethodGet {
				s.withHolds(w, r, next, func(doc map[string]any) {
					items, _ := doc["items"].([]any)
					for _, it := range items {
						if m, ok := it.(map[string]any); ok {
							s.addHolds(m, rt.object.Bucket)
						}
					}
				})
				return
			}
		case "object":
			s.serveObject(w, r, next, rt.object)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (s *Server) serveObject(w http.ResponseWriter, r *http.Request, next http.Handler, id objectID) {
	q := r.URL.Query()
	switch {
	case r.Method == http.MethodDelete:
		gen := s.currentGeneration(id)
		if g, err := strconv.ParseInt(q.Get("generation"), 10, 64); err == nil && g > 0 {
			gen = g
		}
		if st := s.holds.get(id, gen); gen != 0 && st.held() {
			writeHeld(w, id, st)
			return
		}
		rec := record(w, r, next)
		if rec.status < 300 {
			s.holds.drop(id)
		}
		rec.flush(w)
	case r.Method == http.MethodPatch || r.Method == http.MethodPut ||
		(r.Method == http.MethodPost && r.Header.Get("X-HTTP-Method-Override") == "PATCH"):
		body, err := io.ReadAll(r.Body)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		var patch struct {
			TemporaryHold  *bool `json:"temporaryHold"`
			EventBasedHold *bool `json:"eventBasedHold"`
		}
		_ = json.Unmarshal(body, &patch)
		before := s.holds.get(id, s.currentGeneration(id))
		s.withHolds(w, r, next, func(doc map[string]any) {
			gen := generationOf(doc)
			// The filesystem backend gives a patched object a new generation: the holds move
			// with it, as they stay with the one generation on GCS.
			st := holdState{Generation: gen, Temporary: before.Temporary, EventBased: before.EventBased}
			if patch.TemporaryHold != nil {
				st.Temporary = *patch.TemporaryHold
			}
			if patch.EventBasedHold != nil {
				st.EventBased = *patch.EventBasedHold
			}
			s.holds.set(id, st)
			s.addHolds(doc, id.Bucket)
		})
	case r.Method == http.MethodGet && q.Get("alt") != "media":
		s.withHolds(w, r, next, func(doc map[string]any) { s.addHolds(doc, id.Bucket) })
	default:
		next.ServeHTTP(w, r)
	}
}

func generationOf(doc map[string]any) int64 {
	switch g := doc["generation"].(type) {
	case string:
		n, _ := strconv.ParseInt(g, 10, 64)
		return n
	case float64:
		return int64(g)
	}
	return 0
}

// addHolds sets an object resource's hold fields from what is recorded for its generation.
func (s *Server) addHolds(doc map[string]any, bucket string) {
	name, _ := doc["name"].(string)
	st := s.holds.get(objectID{bucket, name}, generationOf(doc))
	if st.Temporary {
		doc["temporaryHold"] = true
	}
	if st.EventBased {
		doc["eventBasedHold"] = true
	}
}

// withHolds serves r and, when the answer is a JSON object, lets edit change it before it is sent.
func (s *Server) withHolds(w http.ResponseWriter, r *http.Request, next http.Handler, edit func(map[string]any)) {
	rec := record(w, r, next)
	var doc map[string]any
	if rec.status == http.StatusOK && json.Unmarshal(rec.body.Bytes(), &doc) == nil {
		edit(doc)
		b, _ := json.Marshal(doc)
		rec.body.Reset()
		rec.body.Write(b)
	}
	rec.flush(w)
}

// recorder holds an answer until it is edited and sent.
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (rc *recorder) Header() http.Header         { return rc.header }
func (rc *recorder) Write(p []byte) (int, error) { return rc.body.Write(p) }
func (rc *recorder) WriteHeader(code int) {
	if rc.status == 0 {
		rc.status = code
	}
}

func record(w http.ResponseWriter, r *http.Request, next http.Handler) *recorder {
	rc := &recorder{header: http.Header{}}
	next.ServeHTTP(rc, r)
	if rc.status == 0 {
		rc.status = http.StatusOK
	}
	return rc
}

func (rc *recorder) flush(w http.ResponseWriter) {
	for k, v := range rc.header {
		w.Header()[k] = v
	}
	w.Header().Set("Content-Length", strconv.Itoa(rc.body.Len()))
	w.WriteHeader(rc.status)
	_, _ = w.Write(rc.body.Bytes())
}

// writeHeld answers as GCS does for an operation a hold forbids.
func writeHeld(w http.ResponseWriter, id objectID, st holdState) {
	kind := "Temporary"
	if !st.Temporary {
		kind = "Event-Based"
	}
	writeError(w, http.StatusForbidden, fmt.Sprintf("Object '%s/%s' is under active %s hold and cannot be deleted, overwritten or archived until hold is removed.",
		id.Bucket, id.Name, kind))
}

func writeError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]any{"code": code, "message": msg,
		"errors": []any{map[string]any{"message": msg, "domain": "global", "reason": "forbidden"}}}})
}
