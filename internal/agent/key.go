package agent

import (
	"crypto/sha256"
	"encoding/hex"

	"github.com/detourhq/detour/internal/wire"
)

// keyVersion changes when the content key's inputs or the stored format change, so that old
// objects are never mistaken for new ones.
const keyVersion = 1

// ContentKey names one response: SHA-256 over the canonical CBOR of the command, its arguments,
// the origin repository's identity, the media types and the protocol version. Equal keys mean
// byte-identical responses, because the cacheable commands' arguments name content by hash.
func ContentKey(repoID string, cmd *wire.CommandRequest) (string, error) {
	args := cmd.Args
	if args == nil {
		args = map[string]any{}
	}
	b, err := wire.Canonical(map[string]any{
		"globalversion": keyVersion,
		"command":       cmd.Name,
		"args":          args,
		"repo":          repoID,
		"mediatype":     wire.MediaTypeFraming,
		"objecttype":    wire.MediaTypeCBOR,
		"version":       wire.APIVersion,
	})
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}
