package logonce

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

func TestWarnsOncePerCauseAndOnceOnRecovery(t *testing.T) {
	var buf bytes.Buffer
	s := New(slog.New(slog.NewTextHandler(&buf, nil)))
	for range 5 {
		s.Warn("store", "store failing")
	}
	s.Warn("etcd", "etcd failing")
	s.Recovered("store", "store back")
	s.Recovered("store", "store back")
	s.Recovered("never", "never warned")
	s.Warn("store", "store failing")
	s.Forget("etcd")
	if s.Active("etcd") || !s.Active("store") {
		t.Fatalf("active: etcd %v store %v", s.Active("etcd"), s.Active("store"))
	}
	got := buf.String()
	for line, want := range map[string]int{"store failing": 2, "etcd failing": 1, "store back": 1, "never warned": 0} {
		if n := strings.Count(got, line); n != want {
			t.Errorf("%q logged %d times, want %d:\n%s", line, n, want, got)
		}
	}
}
