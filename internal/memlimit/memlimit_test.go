package memlimit

import (
	"bytes"
	"log/slog"
	"math"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/KimMachineGun/automemlimit/memlimit"
)

func TestTheLimitIsAShareOfTheContainersUnlessGOMEMLIMITSaysOtherwise(t *testing.T) {
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(-1))
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))

	t.Setenv("GOMEMLIMIT", "")
	container := uint64(1 << 30)
	if got := Set(log, memlimit.Limit(container)); got != int64(float64(container)*0.9) {
		t.Fatalf("limit %d with a container limit of 1 GiB, want 90 %%", got)
	}
	if !strings.Contains(buf.String(), "from the container's limit") {
		t.Fatalf("log: %s", buf.String())
	}

	t.Setenv("AUTOMEMLIMIT", "0.5")
	if got := Set(log, memlimit.Limit(1<<30)); got != 1<<29 {
		t.Fatalf("limit %d with AUTOMEMLIMIT 0.5", got)
	}
	buf.Reset()
	t.Setenv("AUTOMEMLIMIT", "off")
	if got := Set(log, memlimit.Limit(1<<30)); got != 1<<29 {
		t.Fatalf("limit %d with AUTOMEMLIMIT off: it must stay as it was", got)
	}
	if !strings.Contains(buf.String(), "AUTOMEMLIMIT=off") {
		t.Fatalf("log: %s", buf.String())
	}
	buf.Reset()
	t.Setenv("AUTOMEMLIMIT", "90%")
	Set(log, memlimit.Limit(1<<30))
	if !strings.Contains(buf.String(), "AUTOMEMLIMIT must be a share") {
		t.Fatalf("log: %s", buf.String())
	}
	t.Setenv("AUTOMEMLIMIT", "0.9")

	buf.Reset()
	if got := Set(log, func() (uint64, error) { return 0, memlimit.ErrNoLimit }); got != math.MaxInt64 {
		t.Fatalf("limit %d without a container limit, want none", got)
	}
	if !strings.Contains(buf.String(), "no container limit found") {
		t.Fatalf("log: %s", buf.String())
	}

	// GOMEMLIMIT is read by the runtime at start; Set leaves whatever it set alone.
	debug.SetMemoryLimit(700 << 20)
	t.Setenv("GOMEMLIMIT", "700MiB")
	buf.Reset()
	if got := Set(log, memlimit.Limit(1<<30)); got != 700<<20 {
		t.Fatalf("limit %d with GOMEMLIMIT 700MiB", got)
	}
	if !strings.Contains(buf.String(), "from GOMEMLIMIT") {
		t.Fatalf("log: %s", buf.String())
	}
}
