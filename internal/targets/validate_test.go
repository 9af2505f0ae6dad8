package targets

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/detourhq/detour/api/proto/detour/v1"
)

const mib = 1 << 20

// maxMessage bounds a validation error's text whatever the size of the input.
const maxMessage = 300

func checkTarget(edit func(*pb.Target)) func() error {
	return func() error {
		t := validTarget("t1")
		edit(t)
		return ValidateTarget(t)
	}
}

func checkPolicy(edit func(*pb.Policy)) func() error {
	return func() error {
		p := &pb.Policy{RegionPreference: []string{"us-east1", "europe-west1"}}
		edit(p)
		return ValidatePolicy(p)
	}
}

func signed(ttl time.Duration, id string) *pb.UrlForm {
	return &pb.UrlForm{Form: &pb.UrlForm_Signed{Signed: &pb.SignedUrls{Ttl: durationpb.New(ttl), GoogleAccessId: id}}}
}

func repeat(s string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = s
	}
	return out
}

func regions(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("r%d", i)
	}
	return out
}

func pageSize(n int32) func() error {
	return func() error { _, err := ValidatePageSize("page_size", n); return err }
}

// mustReject checks that err is a ValidationError on field whose message names the limit and
// stays short.
func mustReject(t *testing.T, err error, field, limit string) {
	t.Helper()
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("got %v, want a ValidationError on %s", err, field)
	}
	if ve.Field != field {
		t.Errorf("field %q, want %q (%.200s)", ve.Field, field, err)
	}
	if !strings.Contains(ve.Msg, limit) {
		t.Errorf("message %q does not name the limit %q", ve.Msg, limit)
	}
	if n := len(err.Error()); n >= maxMessage {
		t.Errorf("message is %d bytes, want under %d: %.400s", n, maxMessage, err)
	}
}

func TestOversizeAndOutOfRangeInputIsRejectedNamingFieldAndLimit(t *testing.T) {
	t.Parallel()
	huge := strings.Repeat("a", mib)
	hugeURL := "https://cdn.example.com/" + huge
	cases := []struct {
		field, limit string
		check        func() error
	}{
		{"target.name", "63", checkTarget(func(t *pb.Target) { t.Name = huge })},
		{"target.name", "63", checkTarget(func(t *pb.Target) { t.Name = strings.Repeat("a", 64) })},
		{"target.protocol", "http or https", checkTarget(func(t *pb.Target) { t.Protocol = huge })},
		{"target.uris", "16", checkTarget(func(t *pb.Target) { t.Uris = repeat("https://cdn.example.com/", MaxURIs+1) })},
		{"target.uris", "16", checkTarget(func(t *pb.Target) { t.Uris = repeat(hugeURL, 100000) })},
		{"target.uris[3]", "2048", checkTarget(func(t *pb.Target) {
			t.Uris = []string{"https://a/", "https://b/", "https://c/", hugeURL}
		})},
		{"target.uris[0]", "2048", checkTarget(func(t *pb.Target) {
			t.Uris = []string{"https://cdn.example.com/" + strings.Repeat("a", MaxURILength+1-len("https://cdn.example.com/"))}
		})},
		{"target.uris[0]", "is not a URL", checkTarget(func(t *pb.Target) { t.Uris = []string{"://" + huge[:2000]} })},
		{"target.tls_versions", "4", checkTarget(func(t *pb.Target) { t.TlsVersions = []string{"1.0", "1.1", "1.2", "1.3", "1.3"} })},
		{"target.tls_versions", "4", checkTarget(func(t *pb.Target) { t.TlsVersions = repeat("1.3", mib) })},
		{"target.tls_versions[1]", "1.0, 1.1, 1.2, 1.3", checkTarget(func(t *pb.Target) { t.TlsVersions = []string{"1.2", huge} })},
		{"target.region", "63", checkTarget(func(t *pb.Target) { t.Region = huge })},
		{"target.region", "63", checkTarget(func(t *pb.Target) { t.Region = strings.Repeat("a", 64) })},
		{"target.weight", "between 1 and 10000", checkTarget(func(t *pb.Target) { t.Weight = 0 })},
		{"target.weight", "between 1 and 10000", checkTarget(func(t *pb.Target) { t.Weight = MaxWeight + 1 })},
		{"target.weight", "between 1 and 10000", checkTarget(func(t *pb.Target) { t.Weight = 1<<32 - 1 })},
		{"target.store.bucket", "222", checkTarget(func(t *pb.Target) { t.Store.Bucket = huge })},
		{"target.store.prefix", "512", checkTarget(func(t *pb.Target) { t.Store.Prefix = huge })},
		{"target.store.prefix", "512", checkTarget(func(t *pb.Target) { t.Store.Prefix = strings.Repeat("a", MaxPrefixLength+1) })},
		{"target.url_form.public_base_url", "2048", checkTarget(func(t *pb.Target) {
			t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: hugeURL}}
		})},
		{"target.url_form.public_base_url", "2048", checkTarget(func(t *pb.Target) {
			t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: "https://x/" + strings.Repeat("a", MaxBaseURLLength-9)}}
		})},
		{"target.url_form.cdn_base_url", "2048", checkTarget(func(t *pb.Target) {
			t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_CdnBaseUrl{CdnBaseUrl: hugeURL}}
		})},
		{"target.url_form.signed.google_access_id", "256", checkTarget(func(t *pb.Target) { t.UrlForm = signed(time.Hour, huge) })},
		{"target.url_form.signed.google_access_id", "256", checkTarget(func(t *pb.Target) {
			t.UrlForm = signed(time.Hour, strings.Repeat("a", MaxGoogleAccessIDLength+1))
		})},
		{"target.url_form.signed.ttl", "7 days", checkTarget(func(t *pb.Target) { t.UrlForm = signed(8*24*time.Hour, "") })},
		{"policy.region_preference", "64", checkPolicy(func(p *pb.Policy) { p.RegionPreference = regions(MaxRegionPreference + 1) })},
		{"policy.region_preference", "64", checkPolicy(func(p *pb.Policy) { p.RegionPreference = repeat(huge, 100000) })},
		{"policy.region_preference[2]", "63", checkPolicy(func(p *pb.Policy) { p.RegionPreference = append(p.RegionPreference, huge) })},
		{"policy.region_preference[2]", "twice (first at [0])", checkPolicy(func(p *pb.Policy) {
			p.RegionPreference = append(p.RegionPreference, "us-east1")
		})},
		{"policy.fill_claim_ttl", "1h0m0s", checkPolicy(func(p *pb.Policy) { p.FillClaimTtl = durationpb.New(2 * time.Hour) })},
		{"policy.cross_region_copy_threshold", "1000000", checkPolicy(func(p *pb.Policy) { p.CrossRegionCopyThreshold = MaxCrossRegionCopyThreshold + 1 })},
		{"policy.cross_region_copy_window", "24h0m0s", checkPolicy(func(p *pb.Policy) { p.CrossRegionCopyWindow = durationpb.New(25 * time.Hour) })},
		{"policy.cross_region_copy_window", "1s", checkPolicy(func(p *pb.Policy) { p.CrossRegionCopyWindow = durationpb.New(time.Millisecond) })},
		{"policy.min_occurrences", "255", checkPolicy(func(p *pb.Policy) { p.MinOccurrences = MaxMinOccurrences + 1 })},
		{"policy.admission_window", "24h0m0s", checkPolicy(func(p *pb.Policy) { p.AdmissionWindow = durationpb.New(25 * time.Hour) })},
		{"policy.admission_window", "1s", checkPolicy(func(p *pb.Policy) { p.AdmissionWindow = durationpb.New(time.Millisecond) })},
		{"policy.transient_object_ttl", "between 1m0s", checkPolicy(func(p *pb.Policy) { p.TransientObjectTtl = durationpb.New(-time.Hour) })},
		{"policy.transient_object_ttl", "between 1m0s", checkPolicy(func(p *pb.Policy) { p.TransientObjectTtl = durationpb.New(time.Second) })},
		{"policy.transient_object_ttl", "valid duration", checkPolicy(func(p *pb.Policy) {
			p.TransientObjectTtl = &durationpb.Duration{Seconds: 1, Nanos: -1}
		})},
		{"policy.transient_object_ttl", "longer than policy.object_ttl", checkPolicy(func(p *pb.Policy) {
			p.ObjectTtl, p.TransientObjectTtl = durationpb.New(time.Hour), durationpb.New(2*time.Hour)
		})},
		{"policy.object_ttl", "between", checkPolicy(func(p *pb.Policy) { p.ObjectTtl = durationpb.New(-time.Hour) })},
		{"key", "64 lower-case hex digits", func() error { return ValidateKey("key", huge) }},
		{"key", "64 lower-case hex digits", func() error { return ValidateKey("key", strings.Repeat("a", 65)) }},
		{"page_token", "64 lower-case hex digits", func() error { return ValidateKey("page_token", huge) }},
		{"key_prefix", "64", func() error { return ValidateKeyPrefix("key_prefix", huge) }},
		{"key_prefix", "64", func() error { return ValidateKeyPrefix("key_prefix", strings.Repeat("a", MaxKeyPrefixLength+1)) }},
		{"key_prefix", "hex digits", func() error { return ValidateKeyPrefix("key_prefix", "ABC") }},
		{"page_size", "negative", pageSize(-1)},
		{"page_size", "-2147483648 is negative", pageSize(-1 << 31)},
		{"page_size", "1001 is above the limit 1000", pageSize(MaxPageSize + 1)},
		{"page_size", "5000 is above the limit 1000", pageSize(5000)},
		{"name", "63", func() error { return ValidateName("name", huge) }},
	}
	for _, c := range cases {
		t.Run(c.field, func(t *testing.T) { mustReject(t, c.check(), c.field, c.limit) })
	}
}

func TestValuesAtTheLimitsAreAccepted(t *testing.T) {
	uri := "https://cdn.example.com/"
	uri += strings.Repeat("a", MaxURILength-len(uri))
	label := strings.Repeat("a", MaxNameLength)
	part := strings.Repeat("b", 63)
	bucket := part + "." + part + "." + part + "." + strings.Repeat("c", MaxBucketLength-3*64)
	for _, c := range []struct {
		what  string
		check func() error
	}{
		{"name and region of 63", checkTarget(func(t *pb.Target) { t.Name, t.Region = label, label })},
		{"16 URIs of 2048 bytes", checkTarget(func(t *pb.Target) { t.Uris = repeat(uri, MaxURIs) })},
		{"4 TLS versions", checkTarget(func(t *pb.Target) { t.TlsVersions = []string{"1.0", "1.1", "1.2", "1.3"} })},
		{"weight 1", checkTarget(func(t *pb.Target) { t.Weight = MinWeight })},
		{"weight 10000", checkTarget(func(t *pb.Target) { t.Weight = MaxWeight })},
		{"bucket of 222", checkTarget(func(t *pb.Target) { t.Store.Bucket = bucket })},
		{"prefix of 512", checkTarget(func(t *pb.Target) { t.Store.Prefix = strings.Repeat("é", MaxPrefixLength/2) })},
		{"public base URL of 2048", checkTarget(func(t *pb.Target) {
			t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_PublicBaseUrl{PublicBaseUrl: uri}}
		})},
		{"cdn base URL of 2048", checkTarget(func(t *pb.Target) {
			t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_CdnBaseUrl{CdnBaseUrl: uri}}
		})},
		{"google_access_id of 256", checkTarget(func(t *pb.Target) {
			t.UrlForm = signed(time.Hour, strings.Repeat("a", MaxGoogleAccessIDLength))
		})},
		{"64 regions", checkPolicy(func(p *pb.Policy) { p.RegionPreference = regions(MaxRegionPreference) })},
		{"cross-region copy bounds", checkPolicy(func(p *pb.Policy) {
			p.CrossRegionCopyThreshold, p.CrossRegionCopyWindow = MaxCrossRegionCopyThreshold, durationpb.New(24*time.Hour)
		})},
		{"admission bounds", checkPolicy(func(p *pb.Policy) {
			p.MinOccurrences, p.AdmissionWindow = MaxMinOccurrences, durationpb.New(24*time.Hour)
		})},
		{"transient TTL of 1m", checkPolicy(func(p *pb.Policy) { p.TransientObjectTtl = durationpb.New(time.Minute) })},
		{"transient TTL equal to the object TTL", checkPolicy(func(p *pb.Policy) {
			p.ObjectTtl, p.TransientObjectTtl = durationpb.New(time.Hour), durationpb.New(time.Hour)
		})},
		{"transient TTL past the default object TTL", checkPolicy(func(p *pb.Policy) { p.TransientObjectTtl = durationpb.New(40 * 24 * time.Hour) })},
		{"key prefix of 64", func() error { return ValidateKeyPrefix("key_prefix", strings.Repeat("f", MaxKeyPrefixLength)) }},
		{"empty key prefix", func() error { return ValidateKeyPrefix("key_prefix", "") }},
		{"page size 1000", pageSize(MaxPageSize)},
	} {
		if err := c.check(); err != nil {
			t.Errorf("%s: %v", c.what, err)
		}
	}
	if n, err := ValidatePageSize("page_size", 0); err != nil || n != DefaultPageSize {
		t.Errorf("page size 0: %d, %v; want %d", n, err, DefaultPageSize)
	}
}

func TestControlCharactersAndInvalidUTF8AreRejected(t *testing.T) {
	bad := map[string]string{
		"NUL":           "a\x00b",
		"newline":       "a\nb",
		"DEL":           "a\x7fb",
		"C1 control":    "a\u0085b",
		"invalid UTF-8": "a\xffb",
	}
	want := map[string]string{"invalid UTF-8": "not valid UTF-8"}
	for kind, s := range bad {
		for _, c := range []struct {
			field string
			check func() error
		}{
			{"target.name", checkTarget(func(t *pb.Target) { t.Name = s })},
			{"target.region", checkTarget(func(t *pb.Target) { t.Region = s })},
			{"target.uris[0]", checkTarget(func(t *pb.Target) { t.Uris = []string{"https://cdn.example.com/" + s} })},
			{"target.store.prefix", checkTarget(func(t *pb.Target) { t.Store.Prefix = s })},
			{"target.url_form.cdn_base_url", checkTarget(func(t *pb.Target) {
				t.UrlForm = &pb.UrlForm{Form: &pb.UrlForm_CdnBaseUrl{CdnBaseUrl: "https://cdn.example.com/" + s}}
			})},
			{"target.url_form.signed.google_access_id", checkTarget(func(t *pb.Target) { t.UrlForm = signed(time.Hour, s) })},
			{"policy.region_preference[0]", checkPolicy(func(p *pb.Policy) { p.RegionPreference = []string{s} })},
			{"key_prefix", func() error { return ValidateKeyPrefix("key_prefix", s) }},
		} {
			msg := want[kind]
			if msg == "" {
				msg = "control character"
			}
			t.Run(kind+"/"+c.field, func(t *testing.T) { mustReject(t, c.check(), c.field, msg) })
		}
	}
}

func TestQuoteEchoesOnlyAShortPrefix(t *testing.T) {
	for _, s := range []string{"", "us-east1", "a\"b", strings.Repeat("x", maxEcho)} {
		if got, want := quote(s), fmt.Sprintf("%q", s); got != want {
			t.Errorf("quote(%q) = %s, want %s", s, got, want)
		}
	}
	for _, s := range []string{
		strings.Repeat("x", mib),
		strings.Repeat("\x01", mib), // every byte quotes to four
		strings.Repeat("é", mib/2),  // cut at a rune boundary
		strings.Repeat("\xff", mib),
	} {
		q := quote(s)
		if len(q) > maxEcho+2+len("…(1048576 bytes)") || !strings.HasSuffix(q, fmt.Sprintf("…(%d bytes)", len(s))) {
			t.Errorf("quote of %d bytes is %d bytes: %s", len(s), len(q), q)
		}
		if !utf8.ValidString(q) {
			t.Errorf("quote of %d bytes is not valid UTF-8: %s", len(s), q)
		}
	}
}

// TestRejectedWritesLeaveEtcdUntouched checks that validation runs before any write: a rejected
// create, update or policy change leaves the etcd revision and the stored keys as they were.
func TestRejectedWritesLeaveEtcdUntouched(t *testing.T) {
	// Serial: it checks that etcd's revision does not move, which parallel tests would move.
	cli := sharedEtcd(t)
	r := NewRegistry(cli, testPrefix(t))
	ctx := context.Background()
	stored, err := r.CreateTarget(ctx, validTarget("t1"))
	if err != nil {
		t.Fatal(err)
	}
	huge := strings.Repeat("a", mib)
	update := func(edit func(*pb.Target)) *pb.Target {
		tg := validTarget("t1")
		tg.Revision = stored.Revision
		edit(tg)
		return tg
	}
	cases := []struct {
		what, field, key string
		write            func() error
	}{
		{"create with a 1 MiB URI", "target.uris[0]", r.targetKey("t2"), func() error {
			tg := validTarget("t2")
			tg.Uris = []string{"https://cdn.example.com/" + huge}
			_, err := r.CreateTarget(ctx, tg)
			return err
		}},
		{"create with 17 URIs", "target.uris", r.targetKey("t2"), func() error {
			tg := validTarget("t2")
			tg.Uris = repeat("https://cdn.example.com/", MaxURIs+1)
			_, err := r.CreateTarget(ctx, tg)
			return err
		}},
		{"update with weight 10001", "target.weight", r.targetKey("t1"), func() error {
			_, err := r.UpdateTarget(ctx, update(func(t *pb.Target) { t.Weight = MaxWeight + 1 }))
			return err
		}},
		{"update with a 1 MiB prefix", "target.store.prefix", r.targetKey("t1"), func() error {
			_, err := r.UpdateTarget(ctx, update(func(t *pb.Target) { t.Store.Prefix = huge }))
			return err
		}},
		{"update with a 1 MiB google_access_id", "target.url_form.signed.google_access_id", r.targetKey("t1"), func() error {
			_, err := r.UpdateTarget(ctx, update(func(t *pb.Target) { t.UrlForm = signed(time.Hour, huge) }))
			return err
		}},
		{"policy with 65 regions", "policy.region_preference", r.policyKey(), func() error {
			_, err := r.SetPolicy(ctx, &pb.Policy{RegionPreference: regions(MaxRegionPreference + 1)})
			return err
		}},
		{"policy with a region twice", "policy.region_preference[1]", r.policyKey(), func() error {
			_, err := r.SetPolicy(ctx, &pb.Policy{RegionPreference: []string{"us-east1", "us-east1"}})
			return err
		}},
	}
	for _, c := range cases {
		t.Run(c.what, func(t *testing.T) {
			before, err := cli.Get(ctx, c.key)
			if err != nil {
				t.Fatal(err)
			}
			err = c.write()
			var ve *ValidationError
			if !errors.As(err, &ve) || ve.Field != c.field {
				t.Fatalf("got %.200v, want a ValidationError on %s", err, c.field)
			}
			after, err := cli.Get(ctx, c.key)
			if err != nil {
				t.Fatal(err)
			}
			if after.Header.Revision != before.Header.Revision {
				t.Errorf("etcd revision moved from %d to %d", before.Header.Revision, after.Header.Revision)
			}
			if len(after.Kvs) != len(before.Kvs) || len(after.Kvs) == 1 && after.Kvs[0].ModRevision != before.Kvs[0].ModRevision {
				t.Errorf("%s changed: %d keys before, %d after", c.key, len(before.Kvs), len(after.Kvs))
			}
		})
	}
	got, err := r.GetTarget(ctx, "t1")
	if err != nil {
		t.Fatal(err)
	}
	want := storedTarget(stored)
	got.Revision = 0
	if !proto.Equal(got, want) {
		t.Errorf("t1 after rejected updates: %v, want %v", got, want)
	}
	if resp, err := cli.Get(ctx, r.Prefix(), clientv3.WithPrefix(), clientv3.WithCountOnly()); err != nil || resp.Count != 1 {
		t.Errorf("keys under %s: %v, %v; want only t1", r.Prefix(), resp, err)
	}
}
