package blob

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
)

// benchPage is one page of a listing as GCS answers List's selection: 1000 objects named as
// Detour names them (prefix, 64 hex digits), with the next page's token.
func benchPage(next string) []byte {
	var b strings.Builder
	b.WriteString(`{"kind":"storage#objects","items":[`)
	for i := range 1000 {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"name":"hg/%064x","size":"%d","generation":"%d","crc32c":"AAAAAA==","timeCreated":"2026-12-07T03:00:00.123Z"}`,
			i, 1000+i, 1733540000000000+i)
	}
	b.WriteString(`]`)
	if next != "" {
		b.WriteString(`,"nextPageToken":"` + next + `"`)
	}
	b.WriteString(`}`)
	return []byte(b.String())
}

// BenchmarkList is the client's cost of listing a bucket, per page of 1000 objects (a start's
// confirmation lists every record's object): what it allocates is the garbage the collector must
// keep up with while a replica holding millions of records lists them.
func BenchmarkList(b *testing.B) {
	const pages = 20
	body := map[string][]byte{"": benchPage("1")}
	for p := 1; p < pages; p++ {
		next := ""
		if p < pages-1 {
			next = strconv.Itoa(p + 1)
		}
		body[strconv.Itoa(p)] = benchPage(next)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(body[r.URL.Query().Get("pageToken")])
	}))
	defer srv.Close()
	st, err := NewStore(context.Background(), Options{Endpoint: srv.URL + "/storage/v1/"})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	b.ReportAllocs()
	b.ResetTimer()
	n := 0
	for i := 0; i < b.N; i += pages {
		if err := st.List(context.Background(), "b", "hg/", func(Listed) bool { n++; return true }); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(n)/float64(b.N)/1000, "pages/op")
}
