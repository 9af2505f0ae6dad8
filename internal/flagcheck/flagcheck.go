// Package flagcheck validates what Detour's binaries read from their command lines before they
// start: integers that would not fit the field they fill, floats that are not numbers, and
// durations, sizes and rates outside what the product works with. Every error names the flag. It
// decides no limits of its own beyond what each caller passes; the cmd/ mains call it.
package flagcheck

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"
)

// Uint32 is a flag.Value for an unsigned 32-bit field: a value that does not fit is an error at
// parse time, never truncated (99999999999 is not 1215752191).
type Uint32 struct{ p *uint32 }

// NewUint32 sets *p to def and returns the flag.Value that parses into it.
func NewUint32(p *uint32, def uint32) *Uint32 { *p = def; return &Uint32{p} }

func (u *Uint32) Set(s string) error {
	v, err := strconv.ParseUint(s, 0, 32)
	if err != nil {
		return fmt.Errorf("%q is not a whole number between 0 and %d", s, uint32(math.MaxUint32))
	}
	*u.p = uint32(v)
	return nil
}

func (u *Uint32) String() string {
	if u == nil || u.p == nil {
		return "0"
	}
	return strconv.FormatUint(uint64(*u.p), 10)
}

// Int32 is a flag.Value for a signed 32-bit field, refused rather than truncated when it does
// not fit.
type Int32 struct{ p *int32 }

// NewInt32 sets *p to def and returns the flag.Value that parses into it.
func NewInt32(p *int32, def int32) *Int32 { *p = def; return &Int32{p} }

func (i *Int32) Set(s string) error {
	v, err := strconv.ParseInt(s, 0, 32)
	if err != nil {
		return fmt.Errorf("%q is not a whole number between %d and %d", s, math.MinInt32, math.MaxInt32)
	}
	*i.p = int32(v)
	return nil
}

func (i *Int32) String() string {
	if i == nil || i.p == nil {
		return "0"
	}
	return strconv.FormatInt(int64(*i.p), 10)
}

// Error is a flag's value that Detour refuses.
type Error struct {
	Flag string
	Msg  string
}

func (e *Error) Error() string { return "--" + e.Flag + ": " + e.Msg }

func bad(flag, format string, args ...any) error {
	return &Error{Flag: flag, Msg: fmt.Sprintf(format, args...)}
}

// Fraction checks a share between 0 and 1 (NaN is not one).
func Fraction(flag string, v float64) error {
	if math.IsNaN(v) || v < 0 || v > 1 {
		return bad(flag, "%v is not a fraction between 0 and 1", v)
	}
	return nil
}

// Rate checks a per-second rate: a number (not NaN), and when positive at least min (a smaller
// one would let almost nothing through). zeroOrNegative says what 0 and negative values mean to
// the caller ("default", "unbounded"); "" refuses them.
func Rate(flag string, v, min float64, zeroOrNegative string) error {
	switch {
	case math.IsNaN(v):
		return bad(flag, "NaN is not a rate")
	case v <= 0 && zeroOrNegative == "":
		return bad(flag, "%v is not a positive rate", v)
	case v > 0 && v < min:
		return bad(flag, "%v per second is below %v: almost nothing would pass", v, min)
	}
	return nil
}

// Duration checks that d is between min and max; zero passes when the caller reads it as "the
// default" (zeroIsDefault).
func Duration(flag string, d, min, max time.Duration, zeroIsDefault bool) error {
	if d == 0 && zeroIsDefault {
		return nil
	}
	if d < min || d > max {
		return bad(flag, "%s is not between %s and %s", d, min, max)
	}
	return nil
}

// Int checks that v is between min and max; zero passes when the caller reads it as "the
// default" (zeroIsDefault).
func Int(flag string, v, min, max int64, zeroIsDefault bool) error {
	if v == 0 && zeroIsDefault {
		return nil
	}
	if v < min || v > max {
		return bad(flag, "%d is not between %d and %d", v, min, max)
	}
	return nil
}

// All returns every error of checks, joined (nil if none).
func All(checks ...error) error { return errors.Join(checks...) }
