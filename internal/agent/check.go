package agent

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"time"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// maybeCheckLocation checks a sample of the locations the agent hands out, off the request path:
// a HEAD of the URL must answer 200 with the object's size. A location that does not is reported
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

// checkLocation returns what is wrong with a location, or "".
func (a *Agent) checkLocation(loc *Location) string {
	ctx, cancel := context.WithTimeout(a.fillCtx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, loc.URL, nil)
	if err != nil {
		return "bad URL: " + err.Error()
	}
	req.Header.Set("Accept", loc.MediaType)
	resp, err := a.client.Do(req)
	if err != nil {
		return "" // unreachable from here is not proof of a broken object; the prober judges reachability
	}
	resp.Body.Close()
	switch {
	case resp.StatusCode != http.StatusOK:
		return fmt.Sprintf("HEAD answered HTTP %d", resp.StatusCode)
	case resp.ContentLength >= 0 && uint64(resp.ContentLength) != loc.Size:
		return fmt.Sprintf("size %d, the location says %d", resp.ContentLength, loc.Size)
	}
	return ""
}
