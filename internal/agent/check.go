package agent

import (
	"context"
	"math/rand/v2"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/blob"
)

// maybeCheckLocation checks a sample of the locations the agent hands out, off the request path:
// a HEAD of the URL must answer 200 with the object's size, generation and CRC32C. A location that does not is reported
// to the control plane, which checks the store itself and removes the record if the object is
// missing or different. At most a few checks run at once; the rest of the sample is skipped.
func (a *Agent) maybeCheckLocation(key string, loc *Location) {
	if a.cfg.CheckLocations <= 0 || (a.cfg.CheckLocations < 1 && rand.Float64() >= a.cfg.CheckLocations) {
		return
	}
	select {
	case a.checks <- struct{}{}:
	default:
		a.metrics.locationChecks.WithLabelValues("skipped").Inc()
		return
	}
	a.work.Add(1)
	go func() {
		defer a.work.Done()
		defer func() { <-a.checks }()
		problem := a.checkLocation(loc)
		if problem == "" {
			a.metrics.locationChecks.WithLabelValues("ok").Inc()
			return
		}
		a.metrics.locationChecks.WithLabelValues("broken").Inc()
		a.log.Warn("a location did not serve its object; reporting it", "key", key, "target", loc.Target, "problem", problem)
		ctx, cancel := context.WithTimeout(a.fillCtx, 10*time.Second)
		defer cancel()
		if _, err := a.placement.ReportBrokenLocation(ctx, &pb.ReportBrokenLocationRequest{Key: key, Target: loc.Target, Reason: problem}); err != nil {
			a.log.Debug("broken location not reported", "key", key, "err", err)
		}
	}()
}

// checkLocation returns what is wrong with a location, or "": another status than 200, another
// size, or, where the answer names them, another generation or CRC32C than the record's
// (blob.CheckLocation).
func (a *Agent) checkLocation(loc *Location) string {
	ctx, cancel := context.WithTimeout(a.fillCtx, 5*time.Second)
	defer cancel()
	problem, err := blob.CheckLocation(ctx, a.client, loc.URL, blob.Expected{Size: loc.Size, MediaType: loc.MediaType,
		Generation: loc.Generation, CRC32C: loc.CRC32C})
	if err != nil {
		return "" // unreachable from here is not proof of a broken object; the prober judges reachability
	}
	return problem
}
