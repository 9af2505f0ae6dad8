// Package hgbundle holds the Mercurial-specific pieces of the clone-bundle front: talking to an
// origin over wire protocol v1 (capabilities, heads, the getbundle a clone makes, a stream clone
// over getbundle), checking an HG20 stream as it passes, turning it into the bundle files a
// client applies (none-v2, gzip-v2, zstd-v2, stream v2) with their BUNDLESPEC, the clone-bundles
// manifest and the capabilities rewrite that advertises it, and content keys for bundles.
//
// It knows nothing about placement, fills or stores, and must not: the agent's core decides
// where a bundle goes and what a client is told; this package only speaks Mercurial.
//
// What a clone bundle carries, and why (Mercurial's own `hg bundle --all --type gzip-v2` is the
// reference): the changegroup (version 02), the .hgtags filenode cache and the rev-branch cache
// for the bundled changesets, and nothing that describes the repository's current state: no
// phases, no bookmarks, no obsolescence markers. A client applies a clone bundle and then pulls
// from the origin, and that pull brings the phases, bookmarks and markers as they are at clone
// time; a bundle that carried them would bring stale ones (a bookmark deleted since would
// survive in the clone) and make the bundle's bytes depend on state the key does not name. A
// stream bundle carries the store as files, which includes the phase roots of a non-publishing
// repository; the pull after it corrects them.
package hgbundle
