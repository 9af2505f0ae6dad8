package agent

import "sync"

// relayBufferSize is the unit the agent copies responses in: large enough that a multi-megabyte
// answer costs few reads, writes and flushes, small enough that thousands of concurrent relays
// stay within a few hundred megabytes.
const relayBufferSize = 64 << 10

// bufferPool recycles relay buffers (httputil.BufferPool).
type bufferPool struct{ p sync.Pool }

func (b *bufferPool) Get() []byte {
	if v := b.p.Get(); v != nil {
		return *(v.(*[]byte))
	}
	return make([]byte, relayBufferSize)
}

func (b *bufferPool) Put(buf []byte) {
	if cap(buf) != relayBufferSize {
		return
	}
	buf = buf[:relayBufferSize]
	b.p.Put(&buf)
}

var relayBuffers = &bufferPool{}

// chunkPool recycles the copies of object bytes a fill queues for its upload.
var chunkPool = &bufferPool{}

// cloneChunk copies p into a pooled buffer when it fits one; release gives it back.
func cloneChunk(p []byte) []byte {
	if len(p) > relayBufferSize {
		return append([]byte(nil), p...)
	}
	return append(chunkPool.Get()[:0], p...)
}

func releaseChunk(b []byte) { chunkPool.Put(b[:cap(b)]) }
