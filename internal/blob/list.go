package blob

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/storage"
	"github.com/googleapis/gax-go/v2"
	"google.golang.org/api/googleapi"
	"google.golang.org/api/option"
	"google.golang.org/api/option/internaloption"
	htransport "google.golang.org/api/transport/http"
)

// Listings are read from the GCS JSON API directly, not through the storage client's iterator.
// The iterator decodes each object of a page into the API's full object resource and converts it
// to an ObjectAttrs: about 1.9 KB of garbage and 12 allocations per object listed
// (BenchmarkList), whatever fields are selected. A control plane lists every record's object at
// each start and at each reconcile round, millions of objects, while it holds an index of them
// all: that garbage is what made the collector run through the listing, or the process grow. The
// listing here decodes a page into a reused buffer and reused items, and allocates little more
// than each object's name. Authentication is the Google API transport's (the same default
// credentials the storage client finds, read-only scope); an endpoint (an emulator) is used
// without it, as the storage client does.

// listFields are the attributes asked for each listed object: what Listed holds.
const listFields = "items(name,size,generation,crc32c,timeCreated),nextPageToken"

// listAttempts and listRetryFor bound the retries of one page's transient faults (408, 429, 5xx,
// a connection reset or refused): the storage client alone would retry a 503 for ever.
const (
	listAttempts = 5
	listRetryFor = time.Minute
)

// lister is the HTTP client and base URL listings use, made at the first listing (agents never
// list, and a missing credential should fail a listing, not a store that only uploads).
type lister struct {
	endpoint string // from Options, normalized; "" for STORAGE_EMULATOR_HOST or GCS
	mu       sync.Mutex
	hc       *http.Client
	base     string // the JSON API's base URL, ending in /storage/v1/
}

func (l *lister) client(ctx context.Context) (*http.Client, string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.hc != nil {
		return l.hc, l.base, nil
	}
	ep := l.endpoint
	if ep == "" {
		if host := os.Getenv("STORAGE_EMULATOR_HOST"); host != "" {
			var err error
			if ep, err = NormalizeEndpoint(host); err != nil {
				return nil, "", fmt.Errorf("STORAGE_EMULATOR_HOST: %w", err)
			}
		}
	}
	if ep != "" {
		l.hc, l.base = &http.Client{}, ep
		return l.hc, l.base, nil
	}
	// The storage client's defaults: the JSON API of the credentials' universe, or its mTLS
	// endpoint where the environment asks for client certificates. The client outlives this
	// listing: its token source must not end with the listing's context.
	hc, base, err := htransport.NewClient(context.WithoutCancel(ctx), option.WithScopes(storage.ScopeReadOnly),
		internaloption.WithDefaultEndpointTemplate("https://storage.UNIVERSE_DOMAIN/storage/v1/"),
		internaloption.WithDefaultMTLSEndpoint("https://storage.mtls.googleapis.com/storage/v1/"),
		internaloption.WithDefaultUniverseDomain("googleapis.com"))
	if err != nil {
		return nil, "", fmt.Errorf("credentials for listing: %w", err)
	}
	if !strings.HasSuffix(base, "/") {
		base += "/"
	}
	l.hc, l.base = hc, base
	return hc, base, nil
}

// listPage is one page of objects.list as asked for by listFields. Items are reused from page to
// page: only the names are new strings.
type listPage struct {
	Items         []listItem `json:"items"`
	NextPageToken string     `json:"nextPageToken"`
}

type listItem struct {
	Name        string    `json:"name"`
	Size        quotedInt `json:"size"`
	Generation  quotedInt `json:"generation"`
	CRC32C      crc32cB64 `json:"crc32c"`
	TimeCreated time.Time `json:"timeCreated"`
}

// quotedInt is one of the API's 64-bit integers, which it sends as decimal strings. (The json
// package's ",string" option would allocate twice for each.)
type quotedInt uint64

func (q *quotedInt) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*q = 0
		return nil
	}
	if len(b) < 3 || len(b) > 22 || b[0] != '"' || b[len(b)-1] != '"' {
		return fmt.Errorf("%s is not a quoted integer", b)
	}
	var v uint64
	for _, c := range b[1 : len(b)-1] {
		if c < '0' || c > '9' || v > (1<<63-1-uint64(c-'0'))/10 {
			return fmt.Errorf("%s is not a quoted integer below 2^63", b)
		}
		v = v*10 + uint64(c-'0')
	}
	*q = quotedInt(v)
	return nil
}

// crc32cB64 is the API's CRC32C: base64 of its four big-endian bytes.
type crc32cB64 uint32

func (c *crc32cB64) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*c = 0
		return nil
	}
	if len(b) < 2 || b[0] != '"' || b[len(b)-1] != '"' {
		return fmt.Errorf("crc32c %s is not a string", b)
	}
	// Four bytes are eight characters with their padding; Decode needs room for six.
	var v [6]byte
	if src := b[1 : len(b)-1]; len(src) != 8 {
		return fmt.Errorf("crc32c %s is not base64 of 4 bytes", b)
	} else if n, err := base64.StdEncoding.Decode(v[:], src); err != nil || n != 4 {
		return fmt.Errorf("crc32c %s is not base64 of 4 bytes", b)
	}
	*c = crc32cB64(binary.BigEndian.Uint32(v[:]))
	return nil
}

// List calls fn for every object under prefix in bucket, a page at a time, until fn returns false
// or the listing ends. nil means the store answered every page, the last one without a next page
// token: a page that fails (after a few retries of a transient fault) or cannot be read ends the
// listing with an error, and the objects given to fn until then are only part of it. A page is
// read whole before any of its objects is given to fn, so a retried page gives none twice.
func (s *Store) List(ctx context.Context, bucket, prefix string, fn func(Listed) bool) error {
	err := s.list(ctx, bucket, prefix, fn)
	if err != nil {
		return fmt.Errorf("list %s/%s: %w", bucket, prefix, err)
	}
	return nil
}

func (s *Store) list(ctx context.Context, bucket, prefix string, fn func(Listed) bool) error {
	hc, base, err := s.lister.client(ctx)
	if err != nil {
		return err
	}
	var (
		body bytes.Buffer
		page listPage
	)
	q := url.Values{"prefix": {prefix}, "projection": {"noAcl"}, "fields": {listFields}, "maxResults": {"1000"},
		"prettyPrint": {"false"}}
	for {
		u := base + "b/" + url.PathEscape(bucket) + "/o?" + q.Encode()
		if err := readPage(ctx, hc, u, &body); err != nil {
			return err
		}
		// A page may hold no objects and leave "items" out (GCS says so of pages after a token):
		// nothing of the page before must be given again.
		page.Items, page.NextPageToken = page.Items[:0], ""
		if err := json.Unmarshal(body.Bytes(), &page); err != nil {
			return fmt.Errorf("a page of the listing: %w", err)
		}
		for i := range page.Items {
			it := &page.Items[i]
			if !fn(Listed{Name: it.Name, Size: uint64(it.Size), Generation: int64(it.Generation), CRC32C: uint32(it.CRC32C), Created: it.TimeCreated}) {
				return nil
			}
			*it = listItem{} // the next page decodes into a zero item: no field is carried over
		}
		if page.NextPageToken == "" {
			return nil
		}
		q.Set("pageToken", page.NextPageToken)
	}
}

// readPage GETs u into body, retrying transient faults with backoff.
func readPage(ctx context.Context, hc *http.Client, u string, body *bytes.Buffer) error {
	bo := gax.Backoff{Initial: 50 * time.Millisecond, Max: 5 * time.Second, Multiplier: 2}
	until := time.Now().Add(listRetryFor)
	for attempt := 1; ; attempt++ {
		err := getPage(ctx, hc, u, body)
		if err == nil || attempt == listAttempts || !storage.ShouldRetry(err) || ctx.Err() != nil {
			return err
		}
		pause := bo.Pause()
		if time.Now().Add(pause).After(until) {
			return err
		}
		if err := gax.Sleep(ctx, pause); err != nil {
			return err
		}
	}
}

func getPage(ctx context.Context, hc *http.Client, u string, body *bytes.Buffer) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	res, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if err := googleapi.CheckResponse(res); err != nil {
		return err
	}
	body.Reset()
	if _, err := body.ReadFrom(res.Body); err != nil {
		// A connection cut mid-page (io.ErrUnexpectedEOF) is retried: nothing of the page was
		// given to fn yet.
		return fmt.Errorf("a page of the listing cut short: %w", err)
	}
	return nil
}
