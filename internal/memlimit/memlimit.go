// Package memlimit gives the Go collector a soft memory limit below the container's, so that a
// process whose heap swells at times (a control plane's first load allocates several times the
// index it keeps; a reconcile lists every object of a bucket) collects before it is killed and
// hands memory back instead of sitting at twice its live heap.
//
// The limit is, in order: GOMEMLIMIT when set (Go's own variable, bytes or with a unit such as
// 900MiB); otherwise 90 % of the cgroup's memory limit (AUTOMEMLIMIT=0.8 changes the share,
// AUTOMEMLIMIT=off turns it off); otherwise none. github.com/KimMachineGun/automemlimit reads the
// cgroup.
package memlimit

import (
	"log/slog"
	"math"
	"os"
	"runtime/debug"

	"github.com/KimMachineGun/automemlimit/memlimit"
)

// Set sets the limit from provider (memlimit.FromCgroup in the binaries) and logs what it set,
// and why, at info; a failure to read the limit is logged and leaves the process without one.
func Set(log *slog.Logger, provider memlimit.Provider) int64 {
	limit, err := memlimit.Set(memlimit.WithProvider(provider))
	switch {
	case os.Getenv("GOMEMLIMIT") != "":
		log.Info("soft memory limit for the Go collector from GOMEMLIMIT", "limit_bytes", limit)
	case os.Getenv("AUTOMEMLIMIT") == "off":
		log.Info("no soft memory limit for the Go collector from the container's limit: AUTOMEMLIMIT=off")
	case err != nil:
		log.Warn("no soft memory limit for the Go collector (AUTOMEMLIMIT must be a share in (0, 1], or off; set GOMEMLIMIT otherwise)",
			"err", err, "AUTOMEMLIMIT", os.Getenv("AUTOMEMLIMIT"))
	case limit == math.MaxInt64:
		log.Info("no soft memory limit for the Go collector: no container limit found; set GOMEMLIMIT to bound the heap's headroom")
	default:
		log.Info("soft memory limit for the Go collector from the container's limit (GOMEMLIMIT overrides, AUTOMEMLIMIT sets the share)",
			"limit_bytes", limit)
	}
	return debug.SetMemoryLimit(-1)
}

// FromCgroup is the cgroup's memory limit, for Set.
var FromCgroup = memlimit.FromCgroup
