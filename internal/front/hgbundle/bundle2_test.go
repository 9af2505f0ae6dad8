package hgbundle

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

// testPart is a part to write with writeBundle.
type testPart struct {
	typ       string
	mandatory []Param
	advisory  []Param
	chunks    [][]byte
	interrupt bool // write a -1 chunk size after the chunks
}

// writeBundle writes an uncompressed HG20 stream as bundle2.py does.
func writeBundle(params string, parts ...testPart) []byte {
	var b bytes.Buffer
	b.WriteString(Magic)
	binary.Write(&b, binary.BigEndian, int32(len(params)))
	b.WriteString(params)
	for i, p := range parts {
		var h bytes.Buffer
		h.WriteByte(byte(len(p.typ)))
		h.WriteString(p.typ)
		binary.Write(&h, binary.BigEndian, uint32(i))
		h.WriteByte(byte(len(p.mandatory)))
		h.WriteByte(byte(len(p.advisory)))
		all := append(append([]Param(nil), p.mandatory...), p.advisory...)
		for _, kv := range all {
			h.WriteByte(byte(len(kv.Key)))
			h.WriteByte(byte(len(kv.Value)))
		}
		for _, kv := range all {
			h.WriteString(kv.Key)
			h.WriteString(kv.Value)
		}
		binary.Write(&b, binary.BigEndian, int32(h.Len()))
		b.Write(h.Bytes())
		for _, c := range p.chunks {
			binary.Write(&b, binary.BigEndian, int32(len(c)))
			b.Write(c)
		}
		if p.interrupt {
			binary.Write(&b, binary.BigEndian, int32(-1))
			return b.Bytes()
		}
		binary.Write(&b, binary.BigEndian, int32(0))
	}
	binary.Write(&b, binary.BigEndian, int32(0))
	return b.Bytes()
}

func TestReaderPassesAWellFormedStreamThroughUnchanged(t *testing.T) {
	payload := bytes.Repeat([]byte("changegroup data "), 1000)
	in := writeBundle("",
		testPart{typ: "CHANGEGROUP", mandatory: []Param{{"version", "02"}}, advisory: []Param{{"nbchanges", "3"}},
			chunks: [][]byte{payload[:4096], payload[4096:]}},
		testPart{typ: "cache:rev-branch-cache", chunks: [][]byte{[]byte("rbc")}},
		testPart{typ: "hgtagsfnodes"},
	)
	for name, src := range map[string]io.Reader{
		"whole":    bytes.NewReader(in),
		"one byte": iotest.OneByteReader(bytes.NewReader(in)),
		"half":     iotest.HalfReader(bytes.NewReader(in)),
	} {
		t.Run(name, func(t *testing.T) {
			r := NewReader(src)
			out, err := io.ReadAll(r)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out, in) {
				t.Fatalf("output differs from input (%d vs %d bytes)", len(out), len(in))
			}
			parts := r.Parts()
			if len(parts) != 3 || parts[0].Type != "CHANGEGROUP" || parts[1].Type != "cache:rev-branch-cache" {
				t.Fatalf("parts %+v", parts)
			}
			if v, _ := parts[0].Param("version"); v != "02" {
				t.Errorf("version %q", v)
			}
			if v, _ := parts[0].Param("nbchanges"); v != "3" {
				t.Errorf("nbchanges %q", v)
			}
		})
	}
}

func TestReaderRefusesBrokenStreams(t *testing.T) {
	good := writeBundle("", testPart{typ: "CHANGEGROUP", chunks: [][]byte{[]byte("0123456789")}})
	tests := []struct {
		name  string
		in    []byte
		want  string
		abort bool
	}{
		{"empty", nil, "truncated in the stream header", false},
		{"not bundle2", []byte("HG10UN..."), `not "HG20"`, false},
		{"truncated in payload", good[:len(good)-10], "truncated in part 0 (CHANGEGROUP)", false},
		{"no end marker", good[:len(good)-4], "truncated in part 0", false},
		{"trailing bytes", append(append([]byte(nil), good...), 'x'), "after the end-of-stream marker", false},
		{"compressed", writeBundle("Compression=GZ"), "compressed", false},
		{"error part", writeBundle("", testPart{typ: "error:abort", mandatory: []Param{{"message", "unknown revision 'abc'"}}}),
			"unknown revision 'abc'", true},
		{"interrupted part", writeBundle("", testPart{typ: "CHANGEGROUP", chunks: [][]byte{[]byte("x")}, interrupt: true}),
			"interrupted", true},
		{"huge part header", append([]byte("HG20\x00\x00\x00\x00"), 0x7f, 0, 0, 0), "out of range", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := io.ReadAll(NewReader(bytes.NewReader(tt.in)))
			if err == nil {
				t.Fatalf("read %d bytes without an error", len(out))
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not mention %q", err, tt.want)
			}
			if errors.Is(err, ErrOriginAbort) != tt.abort {
				t.Errorf("errors.Is(err, ErrOriginAbort) = %v, want %v", !tt.abort, tt.abort)
			}
		})
	}
}

func TestNextPartKeepsTheBytesItRead(t *testing.T) {
	in := writeBundle("foo=bar", testPart{typ: "stream2", mandatory: []Param{{"requirements", "generaldelta%2Crevlogv1"}},
		chunks: [][]byte{[]byte("files")}})
	r := NewReader(bytes.NewReader(in))
	p, err := r.NextPart()
	if err != nil {
		t.Fatal(err)
	}
	if p.Type != "stream2" {
		t.Fatalf("part %q", p.Type)
	}
	if got := r.Params(); len(got) != 1 || got[0] != (Param{"foo", "bar"}) {
		t.Errorf("params %v", got)
	}
	out, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out, in) {
		t.Fatal("bytes lost by NextPart")
	}
}

func BenchmarkReader(b *testing.B) {
	chunk := bytes.Repeat([]byte{7}, 4096)
	chunks := make([][]byte, 2560) // 10 MiB in 4 KiB chunks, as Mercurial writes them
	for i := range chunks {
		chunks[i] = chunk
	}
	in := writeBundle("", testPart{typ: "CHANGEGROUP", chunks: chunks})
	b.SetBytes(int64(len(in)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := io.Copy(io.Discard, NewReader(bytes.NewReader(in))); err != nil {
			b.Fatal(err)
		}
	}
}
