// Package logonce logs lasting conditions once: a warning the first time a cause is seen, and one
// line when it ends, so an outage that lasts an hour makes two lines, not one per request.
package logonce

import (
	"log/slog"
	"sync"
)

// Set remembers which causes are currently being warned about. The zero value is not usable; make
// one with New.
type Set struct {
	log    *slog.Logger
	active sync.Map // cause → struct{}
}

// New returns a Set that logs to log.
func New(log *slog.Logger) *Set { return &Set{log: log} }

// Warn logs msg at warning level unless cause is already active, and marks it active.
func (s *Set) Warn(cause, msg string, args ...any) {
	if _, loaded := s.active.LoadOrStore(cause, struct{}{}); !loaded {
		s.log.Warn(msg, args...)
	}
}

// Recovered ends cause: if it was active, msg is logged at info level.
func (s *Set) Recovered(cause, msg string, args ...any) {
	if _, had := s.active.LoadAndDelete(cause); had {
		s.log.Info(msg, args...)
	}
}

// Forget ends cause without a log line.
func (s *Set) Forget(cause string) { s.active.Delete(cause) }

// Active reports whether cause is being warned about.
func (s *Set) Active(cause string) bool {
	_, ok := s.active.Load(cause)
	return ok
}
