// Package wire speaks Mercurial's wire protocol version 2 as Detour needs it: frames, the CBOR
// values they carry, command requests, ok/redirect/error responses, and the redirect section of a
// server's capabilities (and the batch sizes it recommends). Response streams a server encoded
// with zlib or zstd-8mb are decoded (encoding.go), so a proxy can relay a compressed answer as it
// came and still read its objects.
//
// Everything here is a pure transformation of bytes. The package reads from and writes to the
// io.Reader and io.Writer it is given, and knows nothing of HTTP routing, gRPC, etcd or stores.
// Every value read from the network is bounded (frame payload, total request size, CBOR nesting,
// element counts) and every malformed input is reported as an error wrapping one of the sentinel
// errors below, never as a panic.
package wire
