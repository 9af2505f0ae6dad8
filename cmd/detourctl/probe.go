package main

import (
	"flag"
	"fmt"
	"strings"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/hgclient"
	"github.com/detourhq/detour/internal/wire"
)

// probe behaves like a redirect-capable client: it reads the agent's capabilities, accepts the
// http and https targets, sends one command, follows a redirect and verifies size and hashes.
func (c *cli) probe(args []string) error {
	fs := flag.NewFlagSet("probe", flag.ContinueOnError)
	agentURL := fs.String("agent", "http://127.0.0.1:8080/", "agent (repository) URL")
	command := fs.String("command", "manifestdata", "command to send")
	node := fs.String("node", "demo", "node argument (any text; the demo origin derives the response from it)")
	size := fs.Uint64("size", 0, "response size to ask the demo origin for (0: its default)")
	noRedirect := fs.Bool("no-redirect", false, "behave like a client without redirect support")
	explain := fs.Bool("explain", false, "then ask the control plane to explain the request's placement (needs operator or reader credentials)")
	if _, err := splitArgs(fs, args); err != nil {
		return err
	}
	ctx, cancel := c.ctx()
	defer cancel()
	client := &hgclient.Client{Base: *agentURL}
	hs, err := client.Capabilities(ctx)
	if err != nil {
		return err
	}
	accepted := hgclient.Accepted(hs.Redirect, "http", "https")
	var rr *wire.RedirectRequest
	if !*noRedirect {
		rr = &wire.RedirectRequest{Targets: accepted, Hashes: []string{"sha256", "sha1"}}
	}
	nodeID := (*node + strings.Repeat("\x00", 20))[:20]
	cmdArgs := map[string]any{"nodes": []any{nodeID}, "tree": "", "fields": wire.Set("parents", "revision")}
	if *size > 0 {
		cmdArgs["size"] = *size
	}
	res, err := client.Command(ctx, *command, cmdArgs, rr)
	if err != nil {
		return err
	}
	objs, err := wire.DecodeObjects(res.Objects)
	if err != nil {
		return fmt.Errorf("response objects do not decode: %w", err)
	}
	how := "inline"
	if res.Redirected {
		how = "redirect"
	}
	fmt.Fprintf(c.out, "targets advertised: %s\n", strings.Join(accepted, ", "))
	fmt.Fprintf(c.out, "%s: %s, %d bytes in %d CBOR objects, %s\n", *command, how, len(res.Objects), len(objs), res.Elapsed.Round(100_000))
	if res.Redirected {
		loc := res.Status.Location
		fmt.Fprintf(c.out, "  location: %s\n  fetched in %s; size matches; verified %s\n", loc.URL, res.Fetch.Round(100_000),
			strings.Join(res.Verified, " and "))
	}
	if !*explain {
		return nil
	}
	key := res.Header.Get(agent.HeaderContentKey)
	if key == "" {
		return fmt.Errorf("the agent did not name the request's content key (it answers %s for cacheable commands sent with a redirect map)", agent.HeaderContentKey)
	}
	region := res.Header.Get(agent.HeaderRegion)
	fmt.Fprintf(c.out, "\nexplain %s, as the agent (region %q) asks:\n", key, region)
	closeConn, err := c.connect()
	if err != nil {
		return err
	}
	defer closeConn()
	return c.explainKey(&pb.ExplainRequest{Key: key, AgentRegion: region, AcceptedTargets: accepted})
}
