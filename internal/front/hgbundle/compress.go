package hgbundle

// Bundle files from an uncompressed HG20 stream. A compressed bundle2 file is the same stream
// with a `Compression=GZ|ZS` stream parameter and everything after the stream parameters
// compressed (bundle2.bundle20.getchunks). GZ is Mercurial's "zlib" engine: a zlib (RFC 1950)
// stream, not gzip (`hg bundle -t gzip-v2` writes 78 9c after the parameters). ZS is a zstd frame.

import (
	"bufio"
	"compress/zlib"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/klauspost/compress/zstd"
)

// Compression is a bundle compression, named as in a BUNDLESPEC.
type Compression string

// The compressions every current client reads (zstd needs Mercurial's C extensions; a client
// without them, such as a pure-Python build, drops zstd entries from the manifest by itself).
const (
	None Compression = "none"
	Gzip Compression = "gzip"
	Zstd Compression = "zstd"
)

// Compressions lists the supported compressions.
var Compressions = []Compression{None, Gzip, Zstd}

// BundleSpec is the BUNDLESPEC of a changegroup bundle (v2: bundle2 with changegroup 02) in this
// compression, as `hg debugbundle --spec` prints it.
func (c Compression) BundleSpec() string { return string(c) + "-v2" }

// wireName is the bundle2 Compression parameter's value ("" for none).
func (c Compression) wireName() (string, error) {
	switch c {
	case None:
		return "", nil
	case Gzip:
		return "GZ", nil
	case Zstd:
		return "ZS", nil
	}
	return "", fmt.Errorf("compression %q: not one of none, gzip, zstd", string(c))
}

// ParseCompression reads a compression name.
func ParseCompression(s string) (Compression, error) {
	c := Compression(s)
	if _, err := c.wireName(); err != nil {
		return "", err
	}
	return c, nil
}

// zstdLevel is Mercurial's default zstd level for bundles (3), which klauspost's default speed
// corresponds to; its window (8 MiB) needs no REQUIREDRAM.
const zstdLevel = zstd.SpeedDefault

// Compress reads an uncompressed HG20 stream from src and writes the bundle file in compression
// c to dst, streaming: memory is bounded by the compressor's window, whatever the bundle's size.
// The stream parameters are kept and Compression added; the rest is compressed as it is.
// Compress checks only the stream header; wrap src in a Reader to check the framing as well.
func Compress(dst io.Writer, src io.Reader, c Compression) error {
	name, err := c.wireName()
	if err != nil {
		return err
	}
	br := bufio.NewReaderSize(src, 64<<10)
	params, err := readStreamHeader(br)
	if err != nil {
		return err
	}
	if name != "" {
		params = append(params, Param{"Compression", name})
	}
	enc := formatStreamParams(params)
	header := make([]byte, 0, 8+len(enc))
	header = append(header, Magic...)
	header = binary.BigEndian.AppendUint32(header, uint32(len(enc)))
	header = append(header, enc...)
	if _, err := dst.Write(header); err != nil {
		return fmt.Errorf("write bundle header: %w", err)
	}
	var w io.WriteCloser
	switch c {
	case None:
		if _, err := io.Copy(dst, br); err != nil {
			return fmt.Errorf("copy bundle: %w", err)
		}
		return nil
	case Gzip:
		w = zlib.NewWriter(dst)
	case Zstd:
		if w, err = zstd.NewWriter(dst, zstd.WithEncoderLevel(zstdLevel), zstd.WithEncoderConcurrency(1)); err != nil {
			return fmt.Errorf("zstd: %w", err)
		}
	}
	if _, err := io.Copy(w, br); err != nil {
		_ = w.Close()
		return fmt.Errorf("compress bundle (%s): %w", c, err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("compress bundle (%s): %w", c, err)
	}
	return nil
}

// CompressReader returns the bundle file in compression c of the uncompressed HG20 stream src as
// a reader, for a consumer that pulls (an upload): Compress runs in a goroutine that ends when
// the returned reader is read to its end or closed. An error of src or of the compression is
// returned by Read.
func CompressReader(src io.Reader, c Compression) io.ReadCloser {
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(Compress(pw, src, c)) }()
	return pr
}

// readStreamHeader reads the magic and the stream parameters of an uncompressed stream.
func readStreamHeader(r io.Reader) ([]Param, error) {
	var head [8]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("bundle2: stream header truncated: %w", io.ErrUnexpectedEOF)
		}
		return nil, fmt.Errorf("bundle2: %w", err)
	}
	if string(head[:4]) != Magic {
		return nil, fmt.Errorf("bundle2: stream starts with %q, not %q", head[:4], Magic)
	}
	size := int32(binary.BigEndian.Uint32(head[4:]))
	if size < 0 || size > maxParamsSize {
		return nil, fmt.Errorf("bundle2: stream parameters size %d out of range", size)
	}
	raw := make([]byte, size)
	if _, err := io.ReadFull(r, raw); err != nil {
		return nil, fmt.Errorf("bundle2: stream parameters truncated: %w", io.ErrUnexpectedEOF)
	}
	params, err := parseStreamParams(string(raw))
	if err != nil {
		return nil, err
	}
	for _, p := range params {
		if strings.EqualFold(p.Key, "compression") {
			return nil, fmt.Errorf("bundle2: stream is already compressed (Compression=%s)", p.Value)
		}
	}
	return params, nil
}
