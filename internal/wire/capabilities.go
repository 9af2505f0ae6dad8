package wire

import (
	"fmt"
)

// RedirectTarget is one advertised redirect target. Fields are in Mercurial's key order. Like
// Mercurial, optional keys appear only when set: SNIRequired nil omits `snirequired`.
type RedirectTarget struct {
	Name        string   `cbor:"name"`
	Protocol    string   `cbor:"protocol"`
	SNIRequired *bool    `cbor:"snirequired,omitempty"`
	TLSVersions []string `cbor:"tlsversions,omitempty"`
	URIs        []string `cbor:"uris"`
}

// RedirectSection is the `redirect` entry of a v2 capabilities map.
type RedirectSection struct {
	Hashes  []string         `cbor:"hashes"`
	Targets []RedirectTarget `cbor:"targets"`
}

// DefaultHashes are the hash algorithms Detour offers, in preference order.
var DefaultHashes = []string{"sha256", "sha1"}

// ReadRedirect returns the redirect section of a v2 capabilities map, or nil if it has none.
func ReadRedirect(caps []byte) (*RedirectSection, error) {
	var m map[string]RawMessage
	if err := Unmarshal(caps, &m); err != nil {
		return nil, fmt.Errorf("capabilities: %w", err)
	}
	if m == nil {
		return nil, fmt.Errorf("%w: capabilities is not a map", ErrBadValue)
	}
	raw, ok := m["redirect"]
	if !ok {
		return nil, nil
	}
	var s RedirectSection
	if err := Unmarshal(raw, &s); err != nil {
		return nil, fmt.Errorf("capabilities: redirect: %w", err)
	}
	return &s, nil
}

// RewriteRedirect returns the v2 capabilities map caps with its `redirect` entry replaced by
// section (removed when section is nil or has no targets). Every other entry keeps its bytes.
func RewriteRedirect(caps []byte, section *RedirectSection) ([]byte, error) {
	var m RawMap
	if err := Unmarshal(caps, (*map[string]RawMessage)(&m)); err != nil {
		return nil, fmt.Errorf("capabilities: %w", err)
	}
	if m == nil {
		return nil, fmt.Errorf("%w: capabilities is not a map", ErrBadValue)
	}
	if section == nil || len(section.Targets) == 0 {
		delete(m, "redirect")
	} else {
		b, err := encMode.Marshal(section)
		if err != nil {
			return nil, err
		}
		m["redirect"] = b
	}
	return m.MarshalCBOR()
}

// RewriteHandshake returns the v1 handshake map (`apibase`, `apis`, `v1capabilities`) with the
// redirect section of its exp-http-v2-0003 API capabilities rewritten. A map without that API is
// returned unchanged.
func RewriteHandshake(handshake []byte, section *RedirectSection) ([]byte, error) {
	return RewriteHandshakeV2(handshake, func(v2 []byte) ([]byte, error) { return RewriteRedirect(v2, section) })
}

// RewriteBatchSizes returns the v2 capabilities map caps with the `recommendedbatchsize` of each
// command named in sizes set to its value (a command caps does not describe is left out). A
// Mercurial client fetches `manifestdata` and `filesdata` in batches of that size, cut from the
// start of a list in revision order. Every other entry keeps its bytes.
func RewriteBatchSizes(caps []byte, sizes map[string]uint64) ([]byte, error) {
	var m RawMap
	if err := Unmarshal(caps, (*map[string]RawMessage)(&m)); err != nil {
		return nil, fmt.Errorf("capabilities: %w", err)
	}
	if m == nil {
		return nil, fmt.Errorf("%w: capabilities is not a map", ErrBadValue)
	}
	rawCmds, ok := m["commands"]
	if !ok || len(sizes) == 0 {
		return caps, nil
	}
	var cmds RawMap
	if err := Unmarshal(rawCmds, (*map[string]RawMessage)(&cmds)); err != nil || cmds == nil {
		return nil, fmt.Errorf("%w: capabilities: commands is not a map", ErrBadValue)
	}
	for name, size := range sizes {
		raw, ok := cmds[name]
		if !ok {
			continue
		}
		var cmd RawMap
		if err := Unmarshal(raw, (*map[string]RawMessage)(&cmd)); err != nil || cmd == nil {
			return nil, fmt.Errorf("%w: capabilities: commands: %s is not a map", ErrBadValue, name)
		}
		b, err := encMode.Marshal(size)
		if err != nil {
			return nil, err
		}
		cmd["recommendedbatchsize"] = b
		if cmds[name], err = cmd.MarshalCBOR(); err != nil {
			return nil, err
		}
	}
	var err error
	if m["commands"], err = cmds.MarshalCBOR(); err != nil {
		return nil, err
	}
	return m.MarshalCBOR()
}

// RewriteHandshakeV2 returns the v1 handshake map (`apibase`, `apis`, `v1capabilities`) with its
// exp-http-v2-0003 capabilities replaced by rewrite's result. A map without that API is returned
// unchanged. RewriteHandshake is the case of the redirect section.
func RewriteHandshakeV2(handshake []byte, rewrite func(v2caps []byte) ([]byte, error)) ([]byte, error) {
	var top RawMap
	if err := Unmarshal(handshake, (*map[string]RawMessage)(&top)); err != nil {
		return nil, fmt.Errorf("handshake: %w", err)
	}
	if top == nil {
		return nil, fmt.Errorf("%w: handshake is not a map", ErrBadValue)
	}
	rawAPIs, ok := top["apis"]
	if !ok {
		return handshake, nil
	}
	var apis RawMap
	if err := Unmarshal(rawAPIs, (*map[string]RawMessage)(&apis)); err != nil {
		return nil, fmt.Errorf("handshake: apis: %w", err)
	}
	if apis == nil {
		return nil, fmt.Errorf("%w: handshake: apis is not a map", ErrBadValue)
	}
	v2, ok := apis[APIVersion]
	if !ok {
		return handshake, nil
	}
	nv2, err := rewrite(v2)
	if err != nil {
		return nil, fmt.Errorf("handshake: apis: %s: %w", APIVersion, err)
	}
	apis[APIVersion] = nv2
	if top["apis"], err = apis.MarshalCBOR(); err != nil {
		return nil, err
	}
	return top.MarshalCBOR()
}
