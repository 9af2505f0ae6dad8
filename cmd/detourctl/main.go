// Command detourctl is the operator's CLI over Detour's Admin API, and a probe that behaves like a
// redirect-capable Mercurial client.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	insecureCreds "google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
	"github.com/detourhq/detour/internal/envflag"
	"github.com/detourhq/detour/internal/pki"
)

const usage = `detourctl: operate a Detour control plane.

Usage:
  detourctl [--controlplane ADDR] [--tls-ca F --tls-cert F --tls-key F | --dev-pki DIR | --insecure]
            [--json] [--timeout D] COMMAND ...

Every flag may also come from the environment: --tls-ca from DETOUR_TLS_CA, and so on. Without
--tls-*, detourctl uses the operator certificate of the development PKI in --dev-pki
(detour-data/pki, which the control plane and make run create).

Commands:
  targets add NAME --region R --uri URL --bucket B [--prefix P] (--public-base-url U | --cdn-base-url U | --signed-ttl D)
                   [--protocol https] [--weight 1] [--tls 1.2,1.3] [--sni] [--heartbeat]
  targets list
  targets get NAME
  targets update NAME [any flag of add]      (compare-and-swap on the revision read)
  targets drain NAME | disable NAME | activate NAME
                   (a draining target serves the copies no active target has, gets no fills, and the
                   janitor copies them away; targets get NAME shows how many are left)
  targets rm NAME
  policy get
  policy set [--min-redirect-bytes N] [--region-preference a,b] [--signed-url-ttl D] [--fill-claim-ttl D] [--object-ttl D]
             [--transient-object-ttl D]
             [--forbid-cross-region-fills[=false]] [--cross-region-copies=false] [--cross-region-copy-threshold N]
             [--cross-region-copy-window D]
  objects ls [--target T] [--prefix KEYPREFIX] [--limit N] [--page-token KEY]
  objects rm KEY
  agents ls                                  (registered agents; LAGGING: behind the target set past the threshold)
  explain KEY [--region R] [--accept a,b] [--size BYTES]
                   (what Place would answer for KEY now, and every step of the decision)
  probe --agent URL [--command manifestdata] [--node NODE] [--size BYTES] [--no-redirect] [--explain]
                   (--explain: then explain the request's key, as its agent asked)
`

type cli struct {
	addr    string
	json    bool
	timeout time.Duration
	out     io.Writer
	conn    *grpc.ClientConn
	// dial makes the credentials of the connection to the control plane.
	dial func() (credentials.TransportCredentials, func(), error)
}

func main() {
	c := &cli{out: os.Stdout}
	fs := flag.NewFlagSet("detourctl", flag.ContinueOnError)
	var (
		files    pki.Files
		devPKI   string
		insecure bool
	)
	fs.StringVar(&c.addr, "controlplane", "127.0.0.1:7700", "control-plane gRPC address (AdminService)")
	fs.StringVar(&files.CA, "tls-ca", "", "CA certificates the control plane's certificate must chain to")
	fs.StringVar(&files.Cert, "tls-cert", "", "operator client certificate")
	fs.StringVar(&files.Key, "tls-key", "", "operator client certificate's key")
	fs.StringVar(&devPKI, "dev-pki", "detour-data/pki", "without --tls-*: the development PKI whose operator certificate to use")
	fs.BoolVar(&insecure, "insecure", false, "plaintext (a control plane started with --insecure)")
	fs.BoolVar(&c.json, "json", false, "print JSON instead of tables")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Second, "deadline of each call")
	fs.Usage = func() { fmt.Fprint(os.Stderr, usage) }
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	if err := envflag.Apply(fs, "DETOUR_"); err != nil {
		fmt.Fprintf(os.Stderr, "detourctl: %v\n", err)
		os.Exit(2)
	}
	if c.timeout <= 0 {
		fmt.Fprintf(os.Stderr, "detourctl: --timeout: %s is not a positive duration\n", c.timeout)
		os.Exit(2)
	}
	c.dial = func() (credentials.TransportCredentials, func(), error) {
		if insecure {
			return insecureCreds.NewCredentials(), func() {}, nil
		}
		if files == (pki.Files{}) {
			files = pki.DevFiles(devPKI).Operator
		}
		creds, err := pki.ClientCredentials(files)
		if err != nil {
			return nil, nil, fmt.Errorf("TLS: %w (give --tls-ca, --tls-cert and --tls-key, or --insecure)", err)
		}
		return creds, creds.Close, nil
	}
	if err := c.run(fs.Args()); err != nil {
		var ue usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(os.Stderr, "detourctl: %v\n\n%s", err, usage)
			os.Exit(2)
		}
		if s, ok := status.FromError(err); ok {
			fmt.Fprintf(os.Stderr, "detourctl: %s: %s\n", s.Code(), s.Message())
		} else {
			fmt.Fprintf(os.Stderr, "detourctl: %v\n", err)
		}
		os.Exit(1)
	}
}

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

func (c *cli) run(args []string) error {
	if len(args) == 0 {
		return usagef("no command")
	}
	if args[0] == "probe" {
		return c.probe(args[1:])
	}
	if len(args) < 2 {
		return usagef("%s needs a subcommand", args[0])
	}
	closeConn, err := c.connect()
	if err != nil {
		return err
	}
	defer closeConn()
	switch args[0] {
	case "agents":
		return c.agents(args[1], args[2:])
	case "explain":
		return c.explain(args[1:])
	case "targets":
		return c.targets(args[1], args[2:])
	case "policy":
		return c.policy(args[1], args[2:])
	case "objects":
		return c.objects(args[1], args[2:])
	}
	return usagef("unknown command %q", args[0])
}

// connect opens the connection to the control plane; the returned func closes it.
func (c *cli) connect() (func(), error) {
	creds, closeCreds, err := c.dial()
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(c.addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		closeCreds()
		return nil, err
	}
	c.conn = conn
	return func() { conn.Close(); closeCreds() }, nil
}

func (c *cli) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), c.timeout)
}

func (c *cli) admin() pb.AdminServiceClient { return pb.NewAdminServiceClient(c.conn) }

// printJSON prints a message as JSON (for scripts).
func (c *cli) printJSON(m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: false}.Marshal(m)
	if err != nil {
		return err
	}
	fmt.Fprintln(c.out, string(b))
	return nil
}

// splitArgs separates positional arguments from flags so that `targets add NAME --flag v` and
// `targets add --flag v NAME` both work.
func splitArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for len(args) > 0 {
		if err := fs.Parse(args); err != nil {
			return nil, usageError{err.Error()}
		}
		args = fs.Args()
		if len(args) > 0 {
			pos = append(pos, args[0])
			args = args[1:]
		}
	}
	return pos, nil
}

func csv(s string) []string {
	if s == "" {
		return nil
	}
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
