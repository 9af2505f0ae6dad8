package main

import (
	"flag"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/flagcheck"
)

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// targetFlags are the flags of `targets add` and `targets update`; set records which were given.
type targetFlags struct {
	fs                                                   *flag.FlagSet
	protocol, region, bucket, prefix, tls, pub, cdn, sig string
	signedID                                             string
	uris                                                 stringList
	weight                                               uint32
	sni, heartbeat                                       bool
	set                                                  map[string]bool
}

func newTargetFlags(name string) *targetFlags {
	f := &targetFlags{fs: flag.NewFlagSet(name, flag.ContinueOnError)}
	f.fs.StringVar(&f.protocol, "protocol", "https", "http or https")
	f.fs.Var(&f.uris, "uri", "URI advertised to clients (repeatable)")
	f.fs.StringVar(&f.region, "region", "", "region")
	weight := flagcheck.NewUint32(&f.weight, 1) // refused, not truncated, past 32 bits
	f.fs.Var(weight, "weight", "relative share of fills (1-10000)")
	f.fs.StringVar(&f.tls, "tls", "", "TLS versions, comma-separated (e.g. 1.2,1.3)")
	f.fs.BoolVar(&f.sni, "sni", false, "clients must support SNI")
	f.fs.StringVar(&f.bucket, "bucket", "", "GCS bucket")
	f.fs.StringVar(&f.prefix, "prefix", "", "object name prefix in the bucket")
	f.fs.StringVar(&f.pub, "public-base-url", "", "public base URL of the bucket")
	f.fs.StringVar(&f.cdn, "cdn-base-url", "", "CDN base URL in front of the bucket")
	f.fs.StringVar(&f.sig, "signed-ttl", "", "use V4-signed URLs valid this long (e.g. 15m)")
	f.fs.StringVar(&f.signedID, "signed-by", "", "service account that signs (default: the control plane's key)")
	f.fs.BoolVar(&f.heartbeat, "heartbeat", false, "the target heartbeats (mirror); unhealthy without heartbeats")
	return f
}

func (f *targetFlags) parse(args []string) ([]string, error) {
	pos, err := splitArgs(f.fs, args)
	f.set = map[string]bool{}
	f.fs.Visit(func(fl *flag.Flag) { f.set[fl.Name] = true })
	return pos, err
}

// apply writes the given flags onto t (all of them when all is true).
func (f *targetFlags) apply(t *pb.Target, all bool) error {
	on := func(n string) bool { return all || f.set[n] }
	if on("protocol") {
		t.Protocol = f.protocol
	}
	if on("uri") {
		t.Uris = f.uris
	}
	if on("region") {
		t.Region = f.region
	}
	if on("weight") {
		t.Weight = f.weight
	}
	if on("tls") {
		t.TlsVersions = csv(f.tls)
	}
	if on("sni") {
		t.SniRequired = f.sni
	}
	if on("heartbeat") {
		t.Heartbeat = f.heartbeat
	}
	if on("bucket") || on("prefix") {
		if t.Store == nil {
			t.Store = &pb.GcsStore{}
		}
		if on("bucket") {
			t.Store.Bucket = f.bucket
		}
		if on("prefix") {
			t.Store.Prefix = f.prefix
		}
	}
	forms := 0
	for _, n := range []string{"public-base-url", "cdn-base-url", "signed-ttl"} {
		if f.set[n] {
			forms++
		}
	}
	if forms > 1 {
		return usagef("give only one of --public-base-url, --cdn-base-url, --signed-ttl")
	}
	switch {
	case f.set["public-base-url"]:
		t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: f.pub}}
	case f.set["cdn-base-url"]:
		t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_CdnBaseUrl{CdnBaseUrl: f.cdn}}
	case f.set["signed-ttl"]:
		d, err := time.ParseDuration(f.sig)
		if err != nil {
			return usagef("--signed-ttl: %v", err)
		}
		t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_Signed{Signed: &pb.SignedUrls{Ttl: durationpb.New(d), GoogleAccessId: f.signedID}}}
	}
	return nil
}

func (c *cli) targets(sub string, args []string) error {
	ctx, cancel := c.ctx()
	defer cancel()
	admin := c.admin()
	one := func(pos []string) (string, error) {
		if len(pos) != 1 {
			return "", usagef("targets %s needs exactly one NAME", sub)
		}
		return pos[0], nil
	}
	switch sub {
	case "add", "update":
		f := newTargetFlags("targets " + sub)
		pos, err := f.parse(args)
		if err != nil {
			return err
		}
		name, err := one(pos)
		if err != nil {
			return err
		}
		if sub == "add" {
			t := &pb.Target{Name: name}
			if err := f.apply(t, true); err != nil {
				return err
			}
			resp, err := admin.CreateTarget(ctx, &pb.CreateTargetRequest{Target: t})
			if err != nil {
				return err
			}
			return c.showTargets(resp.Target)
		}
		// An update changes only the flags given, on the revision read: a concurrent change makes
		// it fail rather than be overwritten.
		got, err := admin.GetTarget(ctx, &pb.GetTargetRequest{Name: name})
		if err != nil {
			return err
		}
		t := proto.Clone(got.Target).(*pb.Target)
		if err := f.apply(t, false); err != nil {
			return err
		}
		resp, err := admin.UpdateTarget(ctx, &pb.UpdateTargetRequest{Target: t})
		if err != nil {
			return err
		}
		return c.showTargets(resp.Target)
	case "list", "ls":
		resp, err := admin.ListTargets(ctx, &pb.ListTargetsRequest{})
		if err != nil {
			return err
		}
		if c.json {
			return c.printJSON(resp)
		}
		return c.showTargets(resp.Targets...)
	case "get":
		name, err := one(args)
		if err != nil {
			return err
		}
		resp, err := admin.GetTarget(ctx, &pb.GetTargetRequest{Name: name})
		if err != nil {
			return err
		}
		if c.json {
			return c.printJSON(resp.Target)
		}
		return c.showTargets(resp.Target)
	case "drain", "disable", "activate":
		name, err := one(args)
		if err != nil {
			return err
		}
		state := map[string]pb.TargetState{"drain": pb.TargetState_TARGET_STATE_DRAINING,
			"disable": pb.TargetState_TARGET_STATE_DISABLED, "activate": pb.TargetState_TARGET_STATE_ACTIVE}[sub]
		resp, err := admin.SetTargetState(ctx, &pb.SetTargetStateRequest{Name: name, State: state})
		if err != nil {
			return err
		}
		return c.showTargets(resp.Target)
	case "rm", "delete":
		name, err := one(args)
		if err != nil {
			return err
		}
		if _, err := admin.DeleteTarget(ctx, &pb.DeleteTargetRequest{Name: name}); err != nil {
			return err
		}
		fmt.Fprintf(c.out, "deleted %s\n", name)
		return nil
	}
	return usagef("unknown targets subcommand %q", sub)
}

func (c *cli) showTargets(ts ...*pb.Target) error {
	if c.json {
		if len(ts) == 1 {
			return c.printJSON(ts[0])
		}
		return c.printJSON(&pb.ListTargetsResponse{Targets: ts})
	}
	w := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tSTATE\tHEALTHY\tREGION\tWEIGHT\tPROTOCOL\tSTORE\tURL FORM\tREVISION\tDRAIN")
	for _, t := range ts {
		fmt.Fprintf(w, "%s\t%s\t%t\t%s\t%d\t%s\tgs://%s/%s\t%s\t%d\t%s\n", t.Name,
			strings.TrimPrefix(t.State.String(), "TARGET_STATE_"), t.Healthy, t.Region, t.Weight, t.Protocol,
			t.GetStore().GetBucket(), t.GetStore().GetPrefix(), urlForm(t), t.Revision, drain(t))
	}
	if err := w.Flush(); err != nil {
		return err
	}
	for _, t := range ts {
		for _, msg := range t.Warnings {
			fmt.Fprintf(c.out, "warning: target %s: %s\n", t.Name, msg)
		}
	}
	return nil
}

// drain says how far a draining target's drain has come: the copies it still serves because no
// active target has the key, of all it holds.
func drain(t *pb.Target) string {
	if t.Drain == nil {
		return "-"
	}
	if t.Drain.SoleCopies == 0 {
		return fmt.Sprintf("complete (0 sole of %d copies)", t.Drain.Copies)
	}
	return fmt.Sprintf("%d sole of %d copies", t.Drain.SoleCopies, t.Drain.Copies)
}

func urlForm(t *pb.Target) string {
	switch f := t.GetUrlForm().GetForm().(type) {
	case *pb.UrlForm_PublicBaseUrl:
		return "public " + f.PublicBaseUrl
	case *pb.UrlForm_CdnBaseUrl:
		return "cdn " + f.CdnBaseUrl
	case *pb.UrlForm_Signed:
		return "signed ttl=" + f.Signed.GetTtl().AsDuration().String()
	}
	return "-"
}
