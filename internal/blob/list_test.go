package blob

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"testing"
	"time"
)

// With no endpoint given, a listing goes where the storage client goes: STORAGE_EMULATOR_HOST
// when it is set (host:port, without authentication).
func TestListUsesTheEnvironmentsEmulatorHost(t *testing.T) {
	emu, st := startGCS(t)
	ctx := context.Background()
	if err := st.Put(ctx, "objects", "p/a", "x", []byte("abc")); err != nil {
		t.Fatal(err)
	}
	t.Setenv("STORAGE_EMULATOR_HOST", emu.Host())
	env, err := NewStore(ctx, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()
	var got []Listed
	if err := env.List(ctx, "objects", "p/", func(l Listed) bool { got = append(got, l); return true }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Name != "p/a" || got[0].Size != 3 || got[0].Generation == 0 {
		t.Fatalf("listed %+v", got)
	}
}

// A page without objects ("items" left out, as GCS may answer after a token) gives nothing: not
// the page before again, not blank objects. Pages are asked for compact, with the fields selected.
func TestListEmptyPageBetweenFullOnes(t *testing.T) {
	pages := map[string]string{
		"":  `{"items":[{"name":"p/a","size":"1","generation":"5"},{"name":"p/b","size":"2","generation":"6"}],"nextPageToken":"2"}`,
		"2": `{"nextPageToken":"3"}`,
		"3": `{"items":[{"name":"p/c","size":"3","generation":"7"}]}`,
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if q.Get("prettyPrint") != "false" || q.Get("fields") != listFields || q.Get("prefix") != "p/" {
			http.Error(w, "unexpected query "+r.URL.RawQuery, http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(pages[q.Get("pageToken")]))
	}))
	defer srv.Close()
	st, err := NewStore(context.Background(), Options{Endpoint: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var names []string
	if err := st.List(context.Background(), "b", "p/", func(l Listed) bool { names = append(names, l.Name); return true }); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(names, []string{"p/a", "p/b", "p/c"}) {
		t.Fatalf("listed %q", names)
	}
}

// A page's fields decode as the API writes them (64-bit integers as decimal strings, the CRC32C as
// base64 of its big-endian bytes, RFC 3339 times), and an item of the next page that lacks a field
// does not keep the previous page's value.
func TestListPageDecoding(t *testing.T) {
	var p listPage
	first := `{"items":[{"name":"hg/a","size":"18446744073","generation":"1733540000123456","crc32c":"AAAAAQ==","timeCreated":"2026-12-07T03:00:00.123Z"}],"nextPageToken":"t1"}`
	if err := json.Unmarshal([]byte(first), &p); err != nil {
		t.Fatal(err)
	}
	it := p.Items[0]
	want := time.Date(2026, 12, 7, 3, 0, 0, 123e6, time.UTC)
	if it.Name != "hg/a" || it.Size != 18446744073 || it.Generation != 1733540000123456 || it.CRC32C != 1 ||
		!it.TimeCreated.Equal(want) || p.NextPageToken != "t1" {
		t.Fatalf("decoded %+v, token %q", it, p.NextPageToken)
	}
	p.Items[0] = listItem{} // as list does after giving the item to fn
	p.NextPageToken = ""
	if err := json.Unmarshal([]byte(`{"items":[{"name":"hg/b"}]}`), &p); err != nil {
		t.Fatal(err)
	}
	if it := p.Items[0]; it.Name != "hg/b" || it.Size != 0 || it.Generation != 0 || it.CRC32C != 0 || p.NextPageToken != "" {
		t.Fatalf("second page %+v, token %q", it, p.NextPageToken)
	}
	for _, bad := range []string{
		`{"items":[{"size":12}]}`,                          // not a string
		`{"items":[{"size":"-1"}]}`,                        // not a decimal
		`{"items":[{"generation":"9223372036854775808"}]}`, // past 2^63-1
		`{"items":[{"crc32c":"AAAA"}]}`,                    // 3 bytes
		`{"items":[{"crc32c":"not base64!"}]}`,
	} {
		if err := json.Unmarshal([]byte(bad), &listPage{}); err == nil {
			t.Errorf("%s decoded", bad)
		}
	}
}

// Any page decodes or is refused with an error, never a panic; an integer or CRC32C that decodes
// is the value written.
func FuzzListPage(f *testing.F) {
	f.Add([]byte(`{"items":[{"name":"hg/a","size":"3","generation":"17","crc32c":"AAAAAQ==","timeCreated":"2026-12-07T03:00:00Z"}],"nextPageToken":"x"}`), uint64(17), uint32(1))
	f.Add([]byte(`{"items":[{"generation":"9223372036854775807"}]}`), uint64(1<<63-1), uint32(0xffffffff))
	f.Add([]byte(`{"items":null}`), uint64(0), uint32(0))
	f.Fuzz(func(t *testing.T, page []byte, n uint64, crc uint32) {
		var p listPage
		_ = json.Unmarshal(page, &p)
		var q quotedInt
		err := q.UnmarshalJSON([]byte(`"` + strconv.FormatUint(n, 10) + `"`))
		if (err == nil) != (n < 1<<63) || (err == nil && uint64(q) != n) {
			t.Fatalf("%d decoded as %d, %v", n, q, err)
		}
		var c crc32cB64
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], crc)
		if err := c.UnmarshalJSON([]byte(`"` + base64.StdEncoding.EncodeToString(b[:]) + `"`)); err != nil || uint32(c) != crc {
			t.Fatalf("crc32c %08x decoded as %08x, %v", crc, uint32(c), err)
		}
	})
}
