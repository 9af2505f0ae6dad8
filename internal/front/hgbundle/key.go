package hgbundle

// Content keys for bundles.
//
// A key names a bundle by what decides its content: the origin repository (its identity and its
// path on the origin), the set of heads the bundle covers, its format (the BUNDLESPEC, which for
// a stream bundle includes the store requirements) and the recipe this package uses to ask for it
// (keyVersion: the getbundle arguments and bundle2 capabilities, the compressor and its level).
//
// What equal keys promise, exactly. The changesets, manifests and files in a bundle are fixed by
// its heads: every changeset is named by a hash of its content and ancestry, and a bundle of
// heads H holds exactly ::H. The bytes are a function of more than that:
//   - the deltas the origin chooses for changegroup 02 come from how its revlogs are stored (the
//     history of pushes, `hg debugupgraderepo`, its Mercurial version and delta settings);
//   - the hgtagsfnodes part lists only the heads whose .hgtags filenode the origin has in its
//     cache at that moment (it does not compute missing ones while serving);
//   - a stream bundle is the store's files as they are: revlog layout, phase roots of a
//     non-publishing repository, caches.
//
// So equal keys mean bundles that apply to the same repository content, and the same bytes
// within one fill: a key is filled once fleet-wide and copied as bytes, and the object's size and
// hashes are those of the fill that was verified. A second fill of the same key, after every copy
// is gone, may produce different bytes of the same content; the object record, not the key, is
// what names the bytes. Nothing that describes the repository's current state (phases, bookmarks,
// obsolescence markers) is in a changegroup bundle; the client's pull after the bundle brings it.
// Compressed bundles are keyed by their own BUNDLESPEC: a gzip-v2 and a zstd-v2 bundle of the
// same heads are two keys.

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
)

// keyVersion changes when what this package asks of the origin, or how it writes a bundle,
// changes, so that older bundles are never taken for newer ones.
const keyVersion = 1

// Node is a changeset id.
type Node [20]byte

// NullNode is the null changeset, the parent of roots (and the only head of an empty repository).
var NullNode Node

// ParseNode reads a node in hex.
func ParseNode(s string) (Node, error) {
	var n Node
	if len(s) != 40 {
		return n, fmt.Errorf("node %q: want 40 hex digits", s)
	}
	if _, err := hex.Decode(n[:], []byte(s)); err != nil {
		return n, fmt.Errorf("node %q: %w", s, err)
	}
	return n, nil
}

func (n Node) String() string { return hex.EncodeToString(n[:]) }

// sortedHex returns the nodes in hex, sorted and without duplicates.
func sortedHex(nodes []Node) []string {
	out := make([]string, 0, len(nodes))
	for _, n := range nodes {
		out = append(out, n.String())
	}
	sort.Strings(out)
	dedup := out[:0]
	for i, s := range out {
		if i == 0 || s != out[i-1] {
			dedup = append(dedup, s)
		}
	}
	return dedup
}

// KeyInput is what a bundle's content key names.
type KeyInput struct {
	RepoID     string // the origin repository's identity, as the agent names it
	RepoPath   string // the repository's path on the origin ("" for the root)
	Heads      []Node // the heads the bundle covers, in any order
	BundleSpec string // the bundle's BUNDLESPEC
	// Version is the caller's own version of what it stores (bump it to start over); the
	// package's recipe version is added by Key.
	Version int
}

// Key returns the content key of the bundle: SHA-256, in hex, over a canonical encoding of the
// protocol ("hgbundle"), the package's and the caller's versions, the repository, the sorted
// heads and the bundle spec.
func Key(in KeyInput) (string, error) {
	if in.RepoID == "" {
		return "", errors.New("bundle key: empty repository id")
	}
	if len(in.Heads) == 0 {
		return "", errors.New("bundle key: no heads")
	}
	for _, h := range in.Heads {
		if h == NullNode {
			return "", errors.New("bundle key: the null node is not a head of a bundle")
		}
	}
	if in.BundleSpec == "" || !strings.Contains(in.BundleSpec, "-") {
		return "", fmt.Errorf("bundle key: bundle spec %q is not <compression>-<version>", in.BundleSpec)
	}
	b, err := json.Marshal(struct {
		Protocol   string   `json:"protocol"`
		KeyVersion int      `json:"keyversion"`
		Version    int      `json:"version"`
		Repo       string   `json:"repo"`
		RepoPath   string   `json:"repopath"`
		BundleSpec string   `json:"bundlespec"`
		Heads      []string `json:"heads"`
	}{"hgbundle", keyVersion, in.Version, in.RepoID, in.RepoPath, in.BundleSpec, sortedHex(in.Heads)})
	if err != nil {
		return "", fmt.Errorf("bundle key: %w", err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}
