package envflag

import (
	"flag"
	"testing"
)

func TestEnvironmentFillsFlagsTheCommandLineLeftOut(t *testing.T) {
	t.Setenv("DETOUR_TLS_CA", "/env/ca.pem")
	t.Setenv("DETOUR_REGION", "eu")
	t.Setenv("DETOUR_WEIGHT", "seven")
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	ca := fs.String("tls-ca", "", "")
	region := fs.String("region", "", "")
	other := fs.String("other", "default", "")
	if err := fs.Parse([]string{"--region", "us"}); err != nil {
		t.Fatal(err)
	}
	if err := Apply(fs, "DETOUR_"); err != nil {
		t.Fatal(err)
	}
	if *ca != "/env/ca.pem" || *region != "us" || *other != "default" || !Given(fs, "tls-ca") || Given(fs, "other") {
		t.Fatalf("tls-ca %q region %q other %q", *ca, *region, *other)
	}
	fs2 := flag.NewFlagSet("y", flag.ContinueOnError)
	fs2.Int("weight", 1, "")
	_ = fs2.Parse(nil)
	if err := Apply(fs2, "DETOUR_"); err == nil {
		t.Fatal("a malformed environment value was accepted")
	}
}
