package hgv2

// Content keys, and which responses may be stored under one.
//
// A content key promises that equal keys mean byte-identical responses (DESIGN invariant 8). A
// real Mercurial client checks no hashes, so a key that covers less than what shapes the bytes
// serves someone else's answer: a corrupted clone. The key hashes the command, all of its
// arguments as the client sent them, the repository's identity, the media types and the protocol
// version. That is enough only for commands whose arguments name their content by hash:
//
//   - manifestdata (nodes, tree, fields, haveparents): manifest revisions are addressed by node;
//     parents and revision data are part of what the node hashes. Cacheable.
//   - filesdata (revisions, fields, pathfilter, haveparents): the changesets named by `revisions`
//     (explicit nodes or a DAG range between nodes) are fixed by their hashes, because the set of
//     visible changesets is closed under ancestry and the origin refuses hidden ones rather than
//     answering differently. `pathfilter` and `haveparents` change which files and which deltas
//     are sent, so they are arguments, and arguments are in the key. The `linknode` of each file
//     revision is the first requested changeset that introduces it, which the same arguments fix.
//     Cacheable.
//   - filedata (path, nodes, fields, haveparents): file revisions are addressed by node, except
//     the `linknode` field: the origin derives it from the file log's link revision against the
//     repository's current changelog view, which hidden (obsolete) changesets change while the
//     arguments stay equal (Mercurial's own server notes the same defect). Cacheable unless
//     `fields` asks for linknodes; then it stays inline.
//   - changesetdata (revisions, fields): `parents` and `revision` are content-addressed, but
//     `bookmarks` and `phase` describe the repository's state now, which moves while the arguments
//     stay equal: a bookmark set on the origin after a cached clone would never reach later clones.
//     Cached only when `fields` names neither (a real client's clone and pull ask for both, so
//     those stay inline); it is not in the default set, and operators add it knowingly.
//
// Everything else (capabilities, heads, known, lookup, listkeys, branchmap, and every command
// that writes) describes current state and is never cached, whatever the configuration says.
// What a key cannot see: an origin whose history is rewritten in place (hg strip, then new
// commits) or whose Mercurial version changes its output. Operators then purge the repository's
// objects or change --repo-id; keyVersion moves when Detour's own inputs change.

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/fxamacker/cbor/v2"

	"github.com/detourhq/detour/internal/wire"
)

// keyVersion changes when the content key's inputs or the stored format change, so that old
// objects are never mistaken for new ones.
const keyVersion = 2

// DefaultCacheable are the commands whose responses are content-addressed by their arguments.
var DefaultCacheable = []string{"manifestdata", "filedata", "filesdata"}

// contentAddressed lists every command the agent can ever cache, with the fields that keep one
// request inline because they describe repository state rather than content.
var contentAddressed = map[string][]string{
	"manifestdata":  nil,
	"filesdata":     nil,
	"filedata":      {"linknode"},
	"changesetdata": {"bookmarks", "phase"},
}

// Cacheability says whether cmd's response may be stored under its content key, and if not, why
// (a reason for metrics and logs).
func Cacheability(cmd *wire.CommandRequest) (bool, string) {
	stateFields, ok := contentAddressed[cmd.Name]
	if !ok {
		return false, "not_content_addressed"
	}
	if len(stateFields) == 0 {
		return true, ""
	}
	fields, ok := stringSet(cmd.Args["fields"])
	if !ok {
		return false, "unreadable_fields"
	}
	for _, f := range stateFields {
		if fields[f] {
			return false, "state_field_" + f
		}
	}
	return true, ""
}

// stringSet reads a `fields` argument: absent, or a set (tag 258) or list of byte strings.
func stringSet(v any) (map[string]bool, bool) {
	if t, ok := v.(cbor.Tag); ok {
		if t.Number != 258 {
			return nil, false
		}
		v = t.Content
	}
	out := map[string]bool{}
	switch items := v.(type) {
	case nil:
		return out, true
	case []any:
		for _, it := range items {
			s, ok := it.(string)
			if !ok {
				return nil, false
			}
			out[s] = true
		}
		return out, true
	}
	return nil, false
}

// ContentKey names one response: SHA-256 over the canonical CBOR of the command, its arguments,
// the origin repository's identity, the media types and the protocol version. Call it only for a
// command Cacheability accepts.
func ContentKey(repoID string, cmd *wire.CommandRequest) (string, error) {
	return ContentKeyAt(repoID, "", cmd)
}

// ContentKeyAt is ContentKey for the repository at repoPath on the origin (the part of the
// request's path before /api/; "" for the origin's root, whose keys are ContentKey's). An origin
// may serve several repositories (hgwebdir) with different readers: the same nodes in two of them
// must be two keys, or a client the origin serves one repository would be redirected to an object
// filled from another (DESIGN invariant 9).
func ContentKeyAt(repoID, repoPath string, cmd *wire.CommandRequest) (string, error) {
	args := cmd.Args
	if args == nil {
		args = map[string]any{}
	}
	f, err := keyFrameOf(repoID, repoPath, cmd.Name)
	if err != nil {
		return "", err
	}
	b, err := wire.Canonical(args)
	if err != nil {
		return "", fmt.Errorf("content key of %s: %w", cmd.Name, err)
	}
	h := sha256.New()
	h.Write(f.head)
	h.Write(b)
	h.Write(f.tail)
	var sum [sha256.Size]byte
	return hex.EncodeToString(h.Sum(sum[:0])), nil
}

// keyInput is what a content key hashes, canonically encoded.
func keyInput(repoID, repoPath, command string, args map[string]any) ([]byte, error) {
	in := map[string]any{
		"globalversion": keyVersion,
		"command":       command,
		"args":          args,
		"repo":          repoID,
		"mediatype":     wire.MediaTypeFraming,
		"objecttype":    wire.MediaTypeCBOR,
		"version":       wire.APIVersion,
	}
	if repoPath != "" {
		in["repopath"] = repoPath
	}
	b, err := wire.Canonical(in)
	if err != nil {
		return nil, fmt.Errorf("content key of %s: %w", command, err)
	}
	return b, nil
}

// keyFrame is keyInput's encoding for one repository and command, split where the arguments go:
// a key hashes head, the canonical arguments and tail. In the canonical order (shorter keys first,
// then bytewise) "args" is the first key, so its value follows the map's head and the key at once.
type keyFrame struct{ head, tail []byte }

type keyFrameID struct{ repoID, repoPath, command string }

// keyFrames remembers the frames of the repositories and commands seen (keyFrameID →
// keyFrame), up to about maxKeyFrames: the repository path comes from the client, so past the
// bound the memory starts over. Reads, one per request, take no lock.
var (
	keyFrames     sync.Map
	keyFrameCount atomic.Int64
)

const maxKeyFrames = 1024

func keyFrameOf(repoID, repoPath, command string) (keyFrame, error) {
	id := keyFrameID{repoID, repoPath, command}
	if f, ok := keyFrames.Load(id); ok {
		return f.(keyFrame), nil
	}
	b, err := keyInput(repoID, repoPath, command, map[string]any{})
	if err != nil {
		return keyFrame{}, err
	}
	// b is the map head, then "args" (0x44 "args") and its empty map (0xa0), then the rest.
	const argsAt = 1 + 5
	if len(b) <= argsAt || string(b[1:argsAt]) != "\x44args" || b[argsAt] != 0xa0 {
		return keyFrame{}, fmt.Errorf("content key of %s: the key's encoding does not begin with its arguments", command)
	}
	f := keyFrame{head: b[:argsAt], tail: b[argsAt+1:]}
	if keyFrameCount.Add(1) > maxKeyFrames {
		keyFrames.Clear()
		keyFrameCount.Store(1)
	}
	keyFrames.Store(id, f)
	return f, nil
}
