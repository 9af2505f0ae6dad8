package main

import (
	"flag"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

// agents runs `agents ls`.
func (c *cli) agents(sub string, args []string) error {
	if sub != "ls" && sub != "list" {
		return usagef("unknown agents subcommand %q", sub)
	}
	if len(args) > 0 {
		return usagef("agents ls takes no arguments")
	}
	ctx, cancel := c.ctx()
	defer cancel()
	resp, err := c.admin().ListAgents(ctx, &pb.ListAgentsRequest{})
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(resp)
	}
	c.printAgents(resp, time.Now())
	return nil
}

func (c *cli) printAgents(resp *pb.ListAgentsResponse, now time.Time) {
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tREGION\tVERSION\tAPPLIED REV\tLAST PLACE\tCACHED\tREFRESHED\tTARGET SET\tOFFLOAD\tSTORE/ORIGIN")
	lagging := 0
	var store, origin uint64
	for _, a := range resp.Agents {
		store, origin = store+a.StoreBytes, origin+a.OriginBytes
		state := "current"
		if a.BehindFor != nil {
			state = "behind " + a.BehindFor.AsDuration().Round(time.Second).String()
		}
		if a.Lagging {
			state = "LAGGING (" + state + ")"
			lagging++
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%d\t%s\t%s\t%s\t%s/%s\n", a.Id, a.Name, a.Region, a.Version, a.AppliedRevision,
			ago(a.LastPlace, now), a.LocationCacheEntries, ago(a.Refreshed, now), state, offloadRatio(a.StoreBytes, a.OriginBytes),
			byteSize(a.StoreBytes), byteSize(a.OriginBytes))
	}
	tw.Flush()
	noun := "agents"
	if len(resp.Agents) == 1 {
		noun = "agent"
	}
	fmt.Fprintf(c.out, "%d %s, %d lagging (behind the control plane's target set, revision %d, for over %s)\n",
		len(resp.Agents), noun, lagging, resp.TargetsRevision, resp.LagThreshold.AsDuration())
	fmt.Fprintf(c.out, "offload %s: %s served by targets, %s by the origin (since each agent started)\n",
		offloadRatio(store, origin), byteSize(store), byteSize(origin))
}

// offloadRatio is the share of answered bytes the targets served instead of the origin: store /
// (store + origin), "-" before any.
func offloadRatio(store, origin uint64) string {
	if store+origin == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", 100*float64(store)/float64(store+origin))
}

// byteSize formats n in decimal units.
func byteSize(n uint64) string {
	const unit = 1000
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %cB", float64(n)/float64(div), "kMGTPE"[exp])
}

func ago(ts *timestamppb.Timestamp, now time.Time) string {
	if ts == nil {
		return "never"
	}
	return now.Sub(ts.AsTime()).Round(time.Second).String() + " ago"
}

// explain runs `explain KEY [--region R] [--accept a,b] [--size N]`.
func (c *cli) explain(args []string) error {
	fs := flag.NewFlagSet("explain", flag.ContinueOnError)
	region := fs.String("region", "", "the asking agent's region")
	accept := fs.String("accept", "", "target names the client accepts, comma-separated (default: every target)")
	size := fs.Uint64("size", 0, "expected response size (0: unknown)")
	pos, err := splitArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("explain needs one KEY")
	}
	return c.explainKey(&pb.ExplainRequest{Key: pos[0], AgentRegion: *region, AcceptedTargets: csv(*accept), SizeHint: *size})
}

func (c *cli) explainKey(req *pb.ExplainRequest) error {
	ctx, cancel := c.ctx()
	defer cancel()
	resp, err := c.admin().Explain(ctx, req)
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(resp)
	}
	c.printExplanation(resp)
	return nil
}

func (c *cli) printExplanation(resp *pb.ExplainResponse) {
	switch {
	case resp.Result == pb.PlaceResult_PLACE_RESULT_REDIRECT:
		fmt.Fprintf(c.out, "decision: redirect to %s (%s)\n", resp.Target, resp.Reason)
	case resp.FillTarget != "":
		fmt.Fprintf(c.out, "decision: inline, and fill %s (%s)\n", resp.FillTarget, resp.Reason)
	default:
		fmt.Fprintf(c.out, "decision: inline (%s)\n", resp.Reason)
	}
	fmt.Fprintf(c.out, "snapshot revision %d, accepted targets %s\n", resp.SnapshotRevision, strings.Join(resp.AcceptedTargets, ","))
	if resp.MinOccurrences > 1 {
		fmt.Fprintf(c.out, "admission: %d of %d misses counted by this replica\n", resp.AdmissionCount, resp.MinOccurrences)
	}
	if resp.Claim != nil {
		fmt.Fprintf(c.out, "fill in progress at %s, claimed by %s\n", resp.Claim.Target, resp.Claim.Holder)
	}
	fmt.Fprintln(c.out, "\nsteps:")
	for _, s := range resp.Steps {
		fmt.Fprintf(c.out, "  %s\n", s)
	}
	if len(resp.Copies) > 0 {
		fmt.Fprintln(c.out, "\ncopies:")
		tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  RANK\tTARGET\tREGION\tSIZE\tDRAINING\tREMOTE\tPREFERENCE\tSCORE\tDROPPED")
		for _, cp := range resp.Copies {
			rank := "-"
			if cp.Kept {
				rank = fmt.Sprint(cp.Rank)
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%d\t%v\t%v\t%d\t%.6g\t%s\n", rank, cp.Target, cp.Region, cp.Size, cp.Draining, cp.Remote,
				cp.RegionPreference, cp.Score, cp.Dropped)
		}
		tw.Flush()
	}
	if len(resp.Targets) > 0 {
		fmt.Fprintln(c.out, "\nfill candidates:")
		tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  TARGET\tREGION\tREGION ORDER\tSCORE\tDROPPED")
		for _, t := range resp.Targets {
			order, score := "-", "-"
			if t.Kept {
				order, score = fmt.Sprint(t.RegionOrder), fmt.Sprintf("%.6g", t.Score)
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", t.Target, t.Region, order, score, t.Dropped)
		}
		tw.Flush()
	}
}
