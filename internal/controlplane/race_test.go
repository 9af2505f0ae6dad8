//go:build race

package controlplane

// raceEnabled: the race detector slows byte-heavy tests (etcd's writes) about sevenfold.
const raceEnabled = true
