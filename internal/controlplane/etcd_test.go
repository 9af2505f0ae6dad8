package controlplane

import (
	"os"
	"sync"
	"testing"

	"github.com/detourhq/detour/internal/etcdembed"
)

var (
	etcdPKIOnce sync.Once
	etcdPKIDir  etcdembed.PKI
	etcdPKIErr  error
)

// etcdPKI is the PKI every etcd of this test binary serves with (startEtcd), so that a replica
// started on any of them presents the right client certificate (startReplicaWith).
func etcdPKI(t *testing.T) etcdembed.PKI {
	t.Helper()
	etcdPKIOnce.Do(func() {
		dir, err := os.MkdirTemp("", "detour-etcd-pki")
		if err != nil {
			etcdPKIErr = err
			return
		}
		etcdPKIDir, etcdPKIErr = etcdembed.EnsurePKI(dir)
	})
	if etcdPKIErr != nil {
		t.Fatal(etcdPKIErr)
	}
	return etcdPKIDir
}
