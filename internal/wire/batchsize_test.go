package wire

import (
	"bytes"
	"errors"
	"os"
	"testing"
)

// testdata/handshake-5.6.1.cbor is `GET /?cmd=capabilities` of a 5.6.1 `hg serve` with the v2 API
// (filesdata advertises 50000, manifestdata 100000).
func TestRewriteBatchSizesInARealHandshake(t *testing.T) {
	hs, err := os.ReadFile("testdata/handshake-5.6.1.cbor")
	if err != nil {
		t.Fatal(err)
	}
	sizes := func(handshake []byte) map[string]uint64 {
		var top struct {
			APIs map[string]struct {
				Commands map[string]struct {
					Size *uint64 `cbor:"recommendedbatchsize"`
				} `cbor:"commands"`
			} `cbor:"apis"`
		}
		if err := Unmarshal(handshake, &top); err != nil {
			t.Fatal(err)
		}
		out := map[string]uint64{}
		for name, c := range top.APIs[APIVersion].Commands {
			if c.Size != nil {
				out[name] = *c.Size
			}
		}
		return out
	}
	if got := sizes(hs); got["filesdata"] != 50000 || got["manifestdata"] != 100000 || len(got) != 2 {
		t.Fatalf("origin advertises %v", got)
	}
	out, err := RewriteHandshakeV2(hs, func(v2 []byte) ([]byte, error) {
		return RewriteBatchSizes(v2, map[string]uint64{"filesdata": 64, "manifestdata": 64, "nosuchcommand": 1})
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := sizes(out); got["filesdata"] != 64 || got["manifestdata"] != 64 || len(got) != 2 {
		t.Fatalf("rewritten handshake advertises %v", got)
	}
	// Setting the sizes the origin has gives its bytes back: nothing else moved.
	same, err := RewriteHandshakeV2(out, func(v2 []byte) ([]byte, error) {
		return RewriteBatchSizes(v2, map[string]uint64{"filesdata": 50000, "manifestdata": 100000})
	})
	if err != nil || !bytes.Equal(same, hs) {
		t.Fatalf("round trip changed the handshake (%v)", err)
	}
	if _, err := RewriteBatchSizes([]byte{0xa1, 0x48, 'c', 'o', 'm', 'm', 'a', 'n', 'd', 's', 0x01}, map[string]uint64{"filesdata": 1}); !errors.Is(err, ErrBadValue) {
		t.Fatalf("commands not a map: %v", err)
	}
}
