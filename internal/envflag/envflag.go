// Package envflag lets every command-line flag also come from the environment: a flag --tls-ca is
// read from DETOUR_TLS_CA when it is not on the command line (the command line wins). Containers
// and systemd units then configure Detour without long argument lists or secrets in argv.
package envflag

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

// Name is the environment variable for flag name under prefix ("DETOUR_" + TLS_CA).
func Name(prefix, name string) string {
	return prefix + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
}

// Apply sets each flag of fs that was not given on the command line from its environment
// variable, if set. Call it after fs.Parse.
func Apply(fs *flag.FlagSet, prefix string) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || err != nil {
			return
		}
		if v, ok := os.LookupEnv(Name(prefix, f.Name)); ok {
			if serr := fs.Set(f.Name, v); serr != nil {
				err = fmt.Errorf("$%s: %w", Name(prefix, f.Name), serr)
			}
		}
	})
	return err
}

// Given reports whether the flag name was set, on the command line or by Apply.
func Given(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}
