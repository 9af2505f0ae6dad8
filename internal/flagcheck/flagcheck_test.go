package flagcheck

import (
	"flag"
	"io"
	"math"
	"strings"
	"testing"
	"time"
)

// Values that do not fit a 32-bit field are refused at parse time, naming the flag, instead of
// being truncated (detourctl --weight 99999999999 was sent as 1215752191).
func TestIntegerFlagsRefuseWhatDoesNotFit(t *testing.T) {
	for _, c := range []struct {
		args []string
		ok   bool
		u    uint32
		i    int32
	}{
		{args: []string{"--weight", "99999999999"}},
		{args: []string{"--weight", "4294967296"}},
		{args: []string{"--weight", "-1"}},
		{args: []string{"--weight", "4294967295"}, ok: true, u: math.MaxUint32, i: 7},
		{args: []string{"--limit", "4294967297"}},
		{args: []string{"--limit", "-2147483649"}},
		{args: []string{"--limit", "-5"}, ok: true, u: 1, i: -5},
		{args: []string{"--limit", "0x10"}, ok: true, u: 1, i: 16},
	} {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		var u uint32
		var i int32
		fs.Var(NewUint32(&u, 1), "weight", "")
		fs.Var(NewInt32(&i, 7), "limit", "")
		err := fs.Parse(c.args)
		switch {
		case c.ok && (err != nil || u != c.u || i != c.i):
			t.Errorf("%v: %v, weight %d, limit %d", c.args, err, u, i)
		case !c.ok && (err == nil || !strings.Contains(err.Error(), strings.TrimPrefix(c.args[0], "--"))):
			t.Errorf("%v: accepted (weight %d, limit %d) or the error does not name the flag: %v", c.args, u, i, err)
		}
	}
}

func TestChecksNameTheFlag(t *testing.T) {
	nan := math.NaN()
	for _, c := range []struct {
		err  error
		want string // "" : no error
	}{
		{Fraction("verify-fills", nan), "--verify-fills: NaN"},
		{Fraction("verify-fills", 1.5), "--verify-fills: 1.5 is not a fraction"},
		{Fraction("verify-fills", 0.25), ""},
		{Rate("copy-rate", nan, 0.1, ""), "--copy-rate: NaN"},
		{Rate("copy-rate", 0, 0.1, ""), "--copy-rate: 0 is not a positive rate"},
		{Rate("claim-rate", -1, 1, "unbounded"), ""},
		{Rate("claim-rate", 1e-9, 1, "unbounded"), "--claim-rate: 1e-09 per second is below 1"},
		{Rate("claim-rate", math.Inf(1), 1, "unbounded"), ""},
		{Duration("probe-interval", time.Nanosecond, 100*time.Millisecond, time.Hour, false), "--probe-interval: 1ns is not between 100ms and 1h0m0s"},
		{Duration("probe-interval", 0, 100*time.Millisecond, time.Hour, true), ""},
		{Int("hot-keys", 1<<40, 1, 10000000, true), "--hot-keys: 1099511627776 is not between 1 and 10000000"},
		{All(Fraction("a", 2), Fraction("b", 3)), "--b: 3"},
	} {
		switch {
		case c.want == "" && c.err != nil:
			t.Errorf("unexpected %v", c.err)
		case c.want != "" && (c.err == nil || !strings.Contains(c.err.Error(), c.want)):
			t.Errorf("got %v, want %q", c.err, c.want)
		}
	}
}
