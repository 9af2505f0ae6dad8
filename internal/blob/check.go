package blob

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"net/http"
	"strconv"
	"strings"
)

// Expected is what a location must serve: the object a record verified.
type Expected struct {
	Size uint64
	// Generation and CRC32C, when Generation is not 0, are checked against the x-goog-generation
	// and x-goog-hash headers, which GCS sends with every object (and CDNs in front of a bucket
	// usually pass on).
	Generation int64
	CRC32C     uint32
	MediaType  string
}

// CheckLocation asks url for its headers (HEAD) and says what is wrong with what it serves ("" if
// nothing): a status other than 200, another size, and, where the answer names them, another
// generation or CRC32C (a same-size replacement). A size alone cannot tell a replaced object; a
// generation pinned in the URL (LocationURLAt) makes a replaced one answer 404. err means the URL
// could not be asked or the server failed (5xx): that is no proof about the object.
func CheckLocation(ctx context.Context, c *http.Client, url string, want Expected) (problem string, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, url, nil)
	if err != nil {
		return "bad URL: " + err.Error(), nil
	}
	if want.MediaType != "" {
		req.Header.Set("Accept", want.MediaType)
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	resp.Body.Close()
	switch {
	case resp.StatusCode >= 500:
		return "", fmt.Errorf("HEAD answered HTTP %d", resp.StatusCode)
	case resp.StatusCode != http.StatusOK:
		return fmt.Sprintf("HEAD answered HTTP %d", resp.StatusCode), nil
	case resp.ContentLength >= 0 && uint64(resp.ContentLength) != want.Size:
		return fmt.Sprintf("size %d, the location says %d", resp.ContentLength, want.Size), nil
	}
	if want.Generation == 0 {
		return "", nil
	}
	if g := resp.Header.Get("X-Goog-Generation"); g != "" {
		if n, err := strconv.ParseInt(g, 10, 64); err == nil && n != want.Generation {
			return fmt.Sprintf("generation %d, the record says %d", n, want.Generation), nil
		}
	}
	if crc, ok := headerCRC32C(resp.Header); ok && crc != want.CRC32C {
		return fmt.Sprintf("crc32c %08x, the record says %08x", crc, want.CRC32C), nil
	}
	return "", nil
}

// headerCRC32C reads the CRC32C from x-goog-hash headers ("crc32c=<base64>,md5=<base64>", one
// header or several).
func headerCRC32C(h http.Header) (uint32, bool) {
	for _, v := range h.Values("X-Goog-Hash") {
		for _, part := range strings.Split(v, ",") {
			b64, ok := strings.CutPrefix(strings.TrimSpace(part), "crc32c=")
			if !ok {
				continue
			}
			b, err := base64.StdEncoding.DecodeString(b64)
			if err != nil || len(b) != 4 {
				return 0, false
			}
			return binary.BigEndian.Uint32(b), true
		}
	}
	return 0, false
}
