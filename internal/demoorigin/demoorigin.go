// Package demoorigin is a small Mercurial wire-protocol-v2 server with deterministic responses,
// standing in for `hg serve` in `make run`, tests and benchmarks. The cacheable commands answer
// with objects derived from their arguments alone, so equal requests get byte-identical responses;
// the response size is the `size` argument when given, else the server's default.
package demoorigin

import (
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/detourhq/detour/internal/wire"
)

// Origin serves one fake repository.
type Origin struct {
	// DefaultSize is the response size of cacheable commands without a `size` argument.
	DefaultSize int
	// MaxSize bounds the `size` argument.
	MaxSize int

	commands    sync.Map // command name → *atomic.Int64
	objectBytes atomic.Int64
}

// New returns an origin whose responses are defaultSize bytes unless asked otherwise.
func New(defaultSize int) *Origin {
	return &Origin{DefaultSize: defaultSize, MaxSize: 256 << 20}
}

// Cacheable are the commands the demo answers with content-derived objects.
var Cacheable = map[string]bool{"manifestdata": true, "filedata": true, "filesdata": true, "changesetdata": true}

// Requests returns how many times a command was served.
func (o *Origin) Requests(command string) int64 {
	if v, ok := o.commands.Load(command); ok {
		return v.(*atomic.Int64).Load()
	}
	return 0
}

// ObjectBytes is the total of object bytes served by cacheable commands.
func (o *Origin) ObjectBytes() int64 { return o.objectBytes.Load() }

func (o *Origin) count(command string) {
	v, _ := o.commands.LoadOrStore(command, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

// Capabilities is the v2 capabilities map the demo advertises.
func Capabilities() wire.Map {
	cmds := wire.Map{}
	for _, c := range []string{"capabilities", "heads", "known", "lookup", "branchmap", "listkeys",
		"manifestdata", "filedata", "filesdata", "changesetdata"} {
		cmds[c] = wire.Map{"args": wire.Map{}, "permissions": []any{"pull"}}
	}
	return wire.Map{
		"commands":           cmds,
		"framingmediatypes":  []any{wire.MediaTypeFraming},
		"pathfilterprefixes": wire.Set("path:", "rootfilesin:"),
		"rawrepoformats":     []any{"generaldelta", "revlogv1"},
	}
}

// ServeHTTP implements the handshake and the v2 command endpoint.
func (o *Origin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet && r.URL.Query().Get("cmd") == "capabilities" {
		o.count("handshake")
		if strings.Contains(r.Header.Get("X-HgUpgrade-1"), wire.APIVersion) && strings.Contains(r.Header.Get("X-HgProto-1"), "cbor") {
			b, err := wire.Marshal(wire.Map{"apibase": "api/", "apis": wire.Map{wire.APIVersion: Capabilities()},
				"v1capabilities": "batch branchmap getbundle known lookup pushkey unbundle=HG10GZ,HG10BZ,HG10UN"})
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			w.Header().Set("Content-Type", wire.MediaTypeCBOR)
			w.Write(b)
			return
		}
		w.Header().Set("Content-Type", "application/mercurial-0.1")
		w.Write([]byte("batch branchmap getbundle known lookup pushkey"))
		return
	}
	prefix := "/api/" + wire.APIVersion + "/ro/"
	if r.Method != http.MethodPost || !strings.HasPrefix(r.URL.Path, prefix) {
		http.NotFound(w, r)
		return
	}
	if r.Header.Get("Accept") != wire.MediaTypeFraming {
		http.Error(w, "client MUST specify Accept header with value: "+wire.MediaTypeFraming, http.StatusNotAcceptable)
		return
	}
	if r.Header.Get("Content-Type") != wire.MediaTypeFraming {
		http.Error(w, "client MUST send Content-Type header with value: "+wire.MediaTypeFraming, http.StatusUnsupportedMediaType)
		return
	}
	name := strings.TrimPrefix(r.URL.Path, prefix)
	w.Header().Set("Content-Type", wire.MediaTypeFraming)
	rs, err := wire.ReadRequest(r.Body, wire.ReaderOptions{})
	rw := wire.NewResponseWriter(w, wire.DefaultMaxPayload)
	if err != nil {
		rw.WriteErrorFrame(0, "protocol", err.Error())
		return
	}
	if len(rs.Commands) != 1 || rs.Commands[0].Name != name {
		rw.WriteErrorFrame(0, "protocol", "expected exactly one command request for "+name)
		return
	}
	cmd := rs.Commands[0]
	o.count(name)
	if !containsIdentity(rs.ContentEncodings) {
		rw.WriteErrorFrame(cmd.RequestID, "protocol", "no supported content encoding (this server has identity only)")
		return
	}
	flusher, _ := w.(http.Flusher)
	switch {
	case name == "capabilities":
		rw.WriteOK(cmd.RequestID, Capabilities())
	case name == "heads":
		rw.WriteOK(cmd.RequestID, []any{strings.Repeat("\x42", 20)})
	case Cacheable[name]:
		size := o.DefaultSize
		if v, ok := cmd.Args["size"].(uint64); ok {
			size = int(min(v, uint64(o.MaxSize)))
		}
		o.writeObjects(rw, flusher, cmd, size)
	default:
		rw.WriteCommandError(cmd.RequestID, fmt.Sprintf("unknown command %q", name))
	}
}

func containsIdentity(encs []string) bool {
	if len(encs) == 0 {
		return true // no settings frame: identity
	}
	for _, e := range encs {
		if e == wire.EncodingIdentity {
			return true
		}
	}
	return false
}

const chunk = 64 << 10

// writeObjects streams {totalitems: n} then n items of at most 64 KiB of revision data, all derived
// from the command and its arguments.
func (o *Origin) writeObjects(rw *wire.ResponseWriter, flusher http.Flusher, cmd *wire.CommandRequest, size int) {
	enc, err := wire.Canonical(map[string]any{"name": cmd.Name, "args": cmd.Args})
	if err != nil {
		rw.WriteCommandError(cmd.RequestID, "cannot encode arguments")
		return
	}
	seed := sha256.Sum256(enc)
	rng := rand.New(rand.NewChaCha8(seed))
	n := (size + chunk - 1) / chunk
	id := cmd.RequestID
	rw.WriteStreamSettings(id, wire.EncodingIdentity)
	rw.WriteValue(id, wire.Status{Status: wire.StatusOK})
	rw.WriteValue(id, wire.Map{"totalitems": n})
	buf := make([]byte, chunk)
	for i := 0; i < n; i++ {
		m := min(chunk, size-i*chunk)
		for j := 0; j < m; j += 8 {
			v := rng.Uint64()
			for k := 0; k < 8 && j+k < m; k++ {
				buf[j+k] = byte(v >> (8 * k))
			}
		}
		node := sha256.Sum256(buf[:m])
		if err := rw.WriteValue(id, wire.Map{"node": string(node[:20]), "revision": buf[:m]}); err != nil {
			return
		}
		o.objectBytes.Add(int64(m))
		if flusher != nil {
			flusher.Flush()
		}
	}
	rw.WriteEOS(id)
}
