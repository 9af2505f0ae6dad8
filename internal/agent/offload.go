package agent

import (
	"net/http"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// Sources of the bytes a front answers with (detour_agent_response_bytes_total's source label).
// The offload ratio, the share of the answers' bytes the origin no longer sends, is
// store / (store + origin).
const (
	// BytesStore: a redirected response's size (the stored object the client fetches from a
	// target instead of the origin). A front counts it when it answers with a redirect.
	BytesStore = "store"
	// BytesOrigin: bytes relayed from the origin to a client, as the origin sent them (encoded,
	// if it compressed them). RelayAs counts them; a front that relays by itself counts its own.
	BytesOrigin = "origin"
	// BytesFilled: bytes a fill stored (counted by the core when the fill is reported READY).
	BytesFilled = "filled"
)

// OtherCommand labels bytes of requests no front named (the plain relay to the origin).
const OtherCommand = "other"

// offload counts answered bytes by command and source, and keeps the totals per source that the
// agent reports to the fleet view.
type offload struct {
	bytes                 *prometheus.CounterVec
	store, origin, filled atomic.Int64
}

func newOffload() *offload {
	return &offload{bytes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_agent_response_bytes_total",
		Help: "Bytes of answers by command and source: store (redirected objects' sizes, served by a target), origin (relayed from the origin as it sent them), filled (stored by fills). Offload ratio: store / (store + origin)."},
		[]string{"command", "source"})}
}

// CountBytes counts n bytes of command's answers from source (BytesStore, BytesOrigin or
// BytesFilled). command must come from a bounded set (a front names its protocol's commands and
// puts anything else under OtherCommand).
func (a *Agent) CountBytes(command, source string, n int64) {
	if n <= 0 {
		return
	}
	switch source {
	case BytesStore:
		a.metrics.offload.store.Add(n)
	case BytesOrigin:
		a.metrics.offload.origin.Add(n)
	case BytesFilled:
		a.metrics.offload.filled.Add(n)
	default:
		return
	}
	a.metrics.offload.bytes.WithLabelValues(command, source).Add(float64(n))
}

// OffloadBytes returns the bytes counted since the agent started, by source.
func (a *Agent) OffloadBytes() (store, origin, filled int64) {
	o := a.metrics.offload
	return o.store.Load(), o.origin.Load(), o.filled.Load()
}

// RelayAs is Relay, counting the bytes of the origin's answer under command (BytesOrigin).
func (a *Agent) RelayAs(w http.ResponseWriter, r *http.Request, outcome, command string) {
	a.Count(outcome)
	a.proxy.ServeHTTP(a.OriginWriter(w, command), recordBodyErr(r))
}

// OriginWriter returns w counting the body bytes written through it as command's bytes from the
// origin (BytesOrigin), each write as it goes to the client rather than once the answer is done:
// a client that has read an answer finds its bytes counted, and a long relay shows in the
// counters while it runs. Flushes and hijacks reach w (through Unwrap).
func (a *Agent) OriginWriter(w http.ResponseWriter, command string) http.ResponseWriter {
	// The labelled counter is looked up once per answer, not at every write of a relay.
	o := a.metrics.offload
	series := o.bytes.WithLabelValues(command, BytesOrigin)
	return &countingWriter{ResponseWriter: w, count: func(n int64) {
		if n > 0 {
			o.origin.Add(n)
			series.Add(float64(n))
		}
	}}
}

type countingWriter struct {
	http.ResponseWriter
	count func(int64)
}

func (c *countingWriter) Write(p []byte) (int, error) {
	// Counted before the write returns, so before the client can have read the bytes.
	c.count(int64(len(p)))
	return c.ResponseWriter.Write(p)
}

func (c *countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }
func (c *countingWriter) Flush()                      { _ = http.NewResponseController(c.ResponseWriter).Flush() }
