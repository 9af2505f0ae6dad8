package main

import (
	"encoding/hex"
	"flag"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/flagcheck"
)

func (c *cli) policy(sub string, args []string) error {
	ctx, cancel := c.ctx()
	defer cancel()
	admin := c.admin()
	switch sub {
	case "get":
		resp, err := admin.GetPolicy(ctx, &pb.GetPolicyRequest{})
		if err != nil {
			return err
		}
		return c.showPolicy(resp.Policy)
	case "set":
		fs := flag.NewFlagSet("policy set", flag.ContinueOnError)
		minBytes := fs.Uint64("min-redirect-bytes", 0, "responses smaller than this stay inline")
		prefs := fs.String("region-preference", "", "regions in preference order after the agent's own, comma-separated")
		signed := fs.Duration("signed-url-ttl", 0, "validity of V4-signed URLs")
		claim := fs.Duration("fill-claim-ttl", 0, "lifetime of a fill claim")
		objTTL := fs.Duration("object-ttl", 0, "how long a stored object is kept after it was stored or last used (0: default 30 days)")
		transientTTL := fs.Duration("transient-object-ttl", 0, "object-ttl of objects likely superseded soon, such as a growing repository's newest batch (0: default 24h; never more than object-ttl)")
		forbid := fs.Bool("forbid-cross-region-fills", false, "keep every fill in the region of the agent that asked (data residency); also keeps drain migration within a region")
		var copyAfter, minOcc uint32 // refused, not clamped, past 32 bits
		copyAfterFlag, minOccFlag := flagcheck.NewUint32(&copyAfter, 0), flagcheck.NewUint32(&minOcc, 0)
		fs.Var(copyAfterFlag, "cross-region-copy-threshold", "copy a key into a region once it was redirected there from another region more than this many times within the window (0: default 10)")
		copyWindow := fs.Duration("cross-region-copy-window", 0, "the window of --cross-region-copy-threshold (0: default 10m)")
		copies := fs.Bool("cross-region-copies", true, "make cross-region copies of hot keys (false turns them off)")
		fs.Var(minOccFlag, "min-occurrences", "grant a fill only on a key's Nth miss within the admission window (0: default 2; 1: fill on the first miss)")
		admWindow := fs.Duration("admission-window", 0, "the window of --min-occurrences (0: default 10m)")
		if _, err := splitArgs(fs, args); err != nil {
			return err
		}
		cur, err := admin.GetPolicy(ctx, &pb.GetPolicyRequest{})
		if err != nil {
			return err
		}
		p := cur.Policy
		dur := func(d time.Duration) *durationpb.Duration { return durationpb.New(d) }
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "min-redirect-bytes":
				p.MinRedirectBytes = *minBytes
			case "region-preference":
				p.RegionPreference = csv(*prefs)
			case "signed-url-ttl":
				p.SignedUrlTtl = dur(*signed)
			case "fill-claim-ttl":
				p.FillClaimTtl = dur(*claim)
			case "object-ttl":
				p.ObjectTtl = dur(*objTTL)
			case "transient-object-ttl":
				p.TransientObjectTtl = dur(*transientTTL)
			case "forbid-cross-region-fills":
				p.ForbidCrossRegionFills = *forbid
			case "cross-region-copy-threshold":
				p.CrossRegionCopyThreshold = copyAfter
			case "cross-region-copy-window":
				p.CrossRegionCopyWindow = dur(*copyWindow)
			case "cross-region-copies":
				p.DisableCrossRegionCopies = !*copies
			case "min-occurrences":
				p.MinOccurrences = minOcc
			case "admission-window":
				p.AdmissionWindow = dur(*admWindow)
			}
		})
		resp, err := admin.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: p})
		if err != nil {
			return err
		}
		return c.showPolicy(resp.Policy)
	}
	return usagef("unknown policy subcommand %q", sub)
}

func (c *cli) showPolicy(p *pb.Policy) error {
	if c.json {
		return c.printJSON(p)
	}
	w := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "min_redirect_bytes\t%d\n", p.MinRedirectBytes)
	fmt.Fprintf(w, "region_preference\t%s\n", strings.Join(p.RegionPreference, ","))
	fmt.Fprintf(w, "signed_url_ttl\t%s\n", orDefault(p.SignedUrlTtl))
	fmt.Fprintf(w, "fill_claim_ttl\t%s\n", orDefault(p.FillClaimTtl))
	fmt.Fprintf(w, "object_ttl\t%s\n", orDefault(p.ObjectTtl))
	fmt.Fprintf(w, "transient_object_ttl\t%s\n", orDefault(p.TransientObjectTtl))
	fmt.Fprintf(w, "forbid_cross_region_fills\t%t\n", p.ForbidCrossRegionFills)
	fmt.Fprintf(w, "cross_region_copies\t%t\n", !p.DisableCrossRegionCopies)
	threshold := "(default)"
	if p.CrossRegionCopyThreshold != 0 {
		threshold = fmt.Sprint(p.CrossRegionCopyThreshold)
	}
	fmt.Fprintf(w, "cross_region_copy_threshold\t%s\n", threshold)
	fmt.Fprintf(w, "cross_region_copy_window\t%s\n", orDefault(p.CrossRegionCopyWindow))
	occurrences := "(default)"
	if p.MinOccurrences != 0 {
		occurrences = fmt.Sprint(p.MinOccurrences)
	}
	fmt.Fprintf(w, "min_occurrences\t%s\n", occurrences)
	fmt.Fprintf(w, "admission_window\t%s\n", orDefault(p.AdmissionWindow))
	fmt.Fprintf(w, "revision\t%d\n", p.Revision)
	return w.Flush()
}

func orDefault(d *durationpb.Duration) string {
	if d == nil {
		return "(default)"
	}
	return d.AsDuration().String()
}

func (c *cli) objects(sub string, args []string) error {
	ctx, cancel := c.ctx()
	defer cancel()
	admin := c.admin()
	switch sub {
	case "ls", "list":
		fs := flag.NewFlagSet("objects ls", flag.ContinueOnError)
		target := fs.String("target", "", "only objects at this target")
		prefix := fs.String("prefix", "", "only keys with this prefix")
		var limit int32 // refused, not truncated, past 32 bits
		fs.Var(flagcheck.NewInt32(&limit, 100), "limit", "page size (at most 1000)")
		token := fs.String("page-token", "", "continue after this key")
		if _, err := splitArgs(fs, args); err != nil {
			return err
		}
		resp, err := admin.ListObjects(ctx, &pb.ListObjectsRequest{Target: *target, KeyPrefix: *prefix,
			PageSize: limit, PageToken: *token})
		if err != nil {
			return err
		}
		if c.json {
			return c.printJSON(resp)
		}
		w := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "KEY\tTARGET\tSIZE\tSHA256\tCREATED\tEXPIRES")
		for _, o := range resp.Objects {
			exp := "never"
			if o.Expires != nil {
				exp = o.Expires.AsTime().Format(time.RFC3339)
			}
			fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\t%s\n", o.Key, o.Target, o.Size, hex.EncodeToString(o.Sha256)[:16]+"…",
				o.Created.AsTime().Format(time.RFC3339), exp)
		}
		if resp.NextPageToken != "" {
			fmt.Fprintf(w, "(more: --page-token %s)\n", resp.NextPageToken)
		}
		return w.Flush()
	case "rm", "delete":
		if len(args) != 1 {
			return usagef("objects rm needs exactly one KEY")
		}
		resp, err := admin.DeleteObjects(ctx, &pb.DeleteObjectsRequest{Key: args[0]})
		if err != nil {
			return err
		}
		fmt.Fprintf(c.out, "deleted %d copies of %s\n", resp.Deleted, args[0])
		return nil
	}
	return usagef("unknown objects subcommand %q", sub)
}
