package gcsemu

import (
	"fmt"
	"os"
	"sync"

	"cloud.google.com/go/pubsub/v2/pstest"
)

// The Pub/Sub emulator GCS emulators publish to. fake-gcs-server publishes the bucket notifications
// created through the API (as GCS does) with a Pub/Sub client that it makes on its first event,
// pointed by the environment only (PUBSUB_EMULATOR_HOST), so there is one per process.
var pubsub struct {
	sync.Mutex
	addr string
	srv  *pstest.Server
}

// PubSub returns the address (host:port) of the Pub/Sub emulator this process's GCS emulators
// publish bucket notifications to: PUBSUB_EMULATOR_HOST when it is set, else an in-process one
// (pstest, from cloud.google.com/go/pubsub/v2) started on a free loopback port on first use, whose
// address is then set as PUBSUB_EMULATOR_HOST. It lives as long as the process and keeps every
// message published to it in memory (about half a kilobyte per event without payload).
func PubSub() (addr string, err error) {
	pubsub.Lock()
	defer pubsub.Unlock()
	if pubsub.addr != "" {
		return pubsub.addr, nil
	}
	if a := os.Getenv("PUBSUB_EMULATOR_HOST"); a != "" {
		pubsub.addr = a
		return a, nil
	}
	defer func() {
		if p := recover(); p != nil { // pstest panics when it cannot listen
			err = fmt.Errorf("start a Pub/Sub emulator: %v", p)
		}
	}()
	srv := pstest.NewServerWithAddress("127.0.0.1:0")
	if err := os.Setenv("PUBSUB_EMULATOR_HOST", srv.Addr); err != nil {
		srv.Close()
		return "", err
	}
	pubsub.srv, pubsub.addr = srv, srv.Addr
	return srv.Addr, nil
}
