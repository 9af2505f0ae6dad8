package agent

import (
	"context"
	"net/http"
	"time"

	"google.golang.org/grpc/status"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// Query is one request a front asks the core about.
type Query struct {
	// Key is the response's content key (64 hex digits): equal keys mean byte-identical responses.
	// A front names its protocol in it.
	Key string
	// Command labels the request in metrics and the control plane's decisions (e.g.
	// "manifestdata", "bundle").
	Command string
	// Repo is the repository's path on the origin ("" for its root): what the origin access
	// check asks about.
	Repo string
	// Accepted are the target names the client accepts, in its order; nil: every target the agent
	// advertises (a protocol whose clients take whatever the server names).
	Accepted []string
	// MediaType is what a fill stores the response as, and what its location serves.
	MediaType string
	// SizeHint is the expected size of the response (0: unknown).
	SizeHint uint64
	// NoFill asks only where a READY copy is: a miss is answered Inline, never Fill (and
	// costs no claim).
	NoFill bool
	// Transient marks a response the front expects to be superseded soon (its key replaced by
	// the repository's next change): a fill of it is kept for the policy's transient_object_ttl
	// instead of its object_ttl (PlaceRequest.transient).
	Transient bool
}

// Outcome is what a decision tells the front to do.
type Outcome int

const (
	// Inline: relay the origin's answer.
	Inline Outcome = iota
	// Redirect: answer with Decision.Location.
	Redirect
	// Fill: relay the origin's answer and write the response into Decision.Fill on the way.
	Fill
	// Denied: the origin would not serve this client; relay the request so that the client
	// gets the origin's own refusal (and can authenticate after it).
	Denied
)

// Decision is the core's answer for one Query.
type Decision struct {
	Outcome Outcome
	// Location is where a Redirect sends the client.
	Location *Location
	// Fill, for a Fill, stores the response: the front must end it with Finish, exactly once,
	// whatever happens (Fail first if the response is not complete).
	Fill *FillWriter
	// Reason says why (for logs and metrics), e.g. "cached", "ready_at_target", "not_admitted".
	Reason string
}

// Label is the decision's outcome as detour_agent_requests_total counts it.
func (d Decision) Label() string {
	switch d.Outcome {
	case Redirect:
		return "redirect"
	case Fill:
		return "inline_fill"
	case Denied:
		return "origin_denied"
	}
	return "inline"
}

// Decide answers where the response for q comes from: the location cache, else the control plane
// (within the place timeout), and only for a client the origin would serve (DESIGN invariant 9).
// It never fails: anything wrong on Detour's side is an Inline decision. r is the client's
// request (its credentials and context).
func (a *Agent) Decide(r *http.Request, q Query) Decision {
	if a.placement == nil {
		return Decision{Reason: "no_control_plane"}
	}
	// Only a client the origin would serve gets a redirect, from the cache too; any other goes to
	// the origin as it is and gets the origin's own answer.
	ans, private := a.authorize(r, q.Repo)
	switch ans {
	case accessDenied:
		return Decision{Outcome: Denied, Reason: "origin_denied"}
	case accessError:
		return Decision{Reason: "access_check_failed"}
	}
	if q.Accepted == nil {
		ts := a.Targets()
		if ts == nil || len(ts.Live) == 0 {
			return Decision{Reason: "no_targets"}
		}
		q.Accepted = ts.Names()
	}
	now := time.Now()
	if loc, ok := a.cache.get(q.Key, q.Accepted, now); ok {
		a.maybeCheckLocation(q.Key, loc)
		return Decision{Outcome: Redirect, Location: loc, Reason: "cached"}
	}
	resp := a.place(r.Context(), q, private)
	switch {
	case resp == nil:
		return Decision{Reason: "place_failed"}
	case resp.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT && resp.Location != nil:
		loc := locationOf(resp)
		a.cache.put(q.Key, loc, resp, now)
		a.maybeCheckLocation(q.Key, loc)
		return Decision{Outcome: Redirect, Location: loc, Reason: resp.Reason}
	case resp.Fill != nil:
		if f := a.startFill(q, resp.Fill); f != nil {
			return Decision{Outcome: Fill, Fill: f, Reason: resp.Reason}
		}
		return Decision{Reason: "fill_declined"}
	}
	return Decision{Reason: resp.Reason}
}

// place asks the control plane, within the place timeout. nil means "answer inline": the control
// plane failed, or is known to be down and is being probed (see cpGate). originRequiresCredentials
// tells the control plane that the origin refuses this repository to anonymous clients.
func (a *Agent) place(ctx context.Context, q Query, originRequiresCredentials bool) *pb.PlaceResponse {
	if a.cp.down.Load() {
		a.metrics.placeFailures.WithLabelValues("control_plane_down").Inc()
		return nil
	}
	now := time.Now()
	a.lastPlace.Store(now.UnixNano())
	client := ctx
	ctx, cancel := context.WithTimeout(ctx, a.cfg.PlaceTimeout)
	defer cancel()
	canFill := !q.NoFill && a.canFill()
	resp, err := a.placement.Place(ctx, &pb.PlaceRequest{Key: q.Key, Command: q.Command, MediaType: q.MediaType,
		AcceptedTargets: q.Accepted, AgentRegion: a.cfg.Region, AgentId: a.cfg.AgentID, SizeHint: q.SizeHint,
		CanFill: &canFill, UnfillableTargets: a.breakers.unfillable(now), OriginRequiresCredentials: originRequiresCredentials,
		Transient: q.Transient})
	a.metrics.placeLatency.Observe(time.Since(now).Seconds())
	if err != nil {
		if client.Err() != nil {
			// The client went away: that says nothing about the control plane.
			a.metrics.placeFailures.WithLabelValues("client_gone").Inc()
			return nil
		}
		a.metrics.placeFailures.WithLabelValues(status.Code(err).String()).Inc()
		a.placeFailed(err)
		return nil
	}
	return resp
}

// canFill reports whether the agent would take a fill grant now.
func (a *Agent) canFill() bool {
	return a.store != nil && a.cfg.Region != "" && !a.cfg.NoFills && a.budget.canStart()
}
