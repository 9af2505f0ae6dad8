package hgv2

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/url"
	"testing"

	"github.com/detourhq/detour/internal/agent"
	"github.com/detourhq/detour/internal/wire"
)

func TestCacheabilityKeepsRepositoryStateInline(t *testing.T) {
	list := func(items ...any) []any { return items }
	cases := []struct {
		name   string
		cmd    string
		fields any
		want   bool
		why    string
	}{
		{"manifestdata", "manifestdata", wire.Set("parents", "revision"), true, ""},
		{"filesdata with linknodes", "filesdata", wire.Set("linknode", "parents", "revision"), true, ""},
		{"filedata", "filedata", wire.Set("parents", "revision"), true, ""},
		{"filedata with linknodes", "filedata", wire.Set("linknode", "revision"), false, "state_field_linknode"},
		{"changesetdata as a clone asks", "changesetdata", wire.Set("bookmarks", "parents", "phase", "revision"), false, "state_field_bookmarks"},
		{"changesetdata with phase only", "changesetdata", list("phase", "revision"), false, "state_field_phase"},
		{"changesetdata content only", "changesetdata", wire.Set("parents", "revision"), true, ""},
		{"changesetdata without fields", "changesetdata", nil, true, ""},
		{"changesetdata with unreadable fields", "changesetdata", "bookmarks", false, "unreadable_fields"},
		{"changesetdata with fields as a list", "changesetdata", list("parents"), true, ""},
		{"heads", "heads", nil, false, "not_content_addressed"},
		{"listkeys", "listkeys", nil, false, "not_content_addressed"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			args := map[string]any{}
			if c.fields != nil {
				args["fields"] = c.fields
			}
			ok, why := Cacheability(&wire.CommandRequest{Name: c.cmd, Args: args})
			if ok != c.want || why != c.why {
				t.Fatalf("Cacheability = %v %q, want %v %q", ok, why, c.want, c.why)
			}
		})
	}
}

func TestNewRefusesToCacheStateCommands(t *testing.T) {
	core := func() *agent.Agent {
		a, err := agent.New(context.Background(), agent.Config{Origin: mustURL(t, "http://127.0.0.1:1/")})
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	for _, cmd := range []string{"heads", "listkeys", "capabilities", "pushkey"} {
		if _, err := New(core(), Config{Cacheable: []string{"filesdata", cmd}}); err == nil {
			t.Errorf("New accepted %q as cacheable", cmd)
		}
	}
	if _, err := New(core(), Config{Cacheable: []string{"changesetdata"}}); err != nil {
		t.Errorf("changesetdata refused: %v", err)
	}
}

func TestContentKeyCoversEveryArgument(t *testing.T) {
	base := map[string]any{"revisions": []any{map[string]any{"type": "changesetexplicit", "nodes": []any{"n1"}}},
		"fields": wire.Set("revision"), "haveparents": true, "pathfilter": map[string]any{"include": []any{"path:a"}}}
	key := func(repo string, mutate func(map[string]any)) string {
		args := map[string]any{}
		for k, v := range base {
			args[k] = v
		}
		if mutate != nil {
			mutate(args)
		}
		k, err := ContentKey(repo, &wire.CommandRequest{Name: "filesdata", Args: args})
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	k0 := key("r", nil)
	if key("r", nil) != k0 {
		t.Fatal("content key is not deterministic")
	}
	for name, m := range map[string]func(map[string]any){
		"haveparents": func(a map[string]any) { a["haveparents"] = false },
		"pathfilter":  func(a map[string]any) { a["pathfilter"] = map[string]any{"include": []any{"path:b"}} },
		"fields":      func(a map[string]any) { a["fields"] = wire.Set("revision", "linknode") },
		"revisions":   func(a map[string]any) { a["revisions"] = []any{} },
	} {
		if key("r", m) == k0 {
			t.Errorf("changing %s keeps the content key", name)
		}
	}
	if key("other", nil) == k0 {
		t.Error("another repository has the same content key")
	}
	at := func(path string) string {
		k, err := ContentKeyAt("r", path, &wire.CommandRequest{Name: "filesdata", Args: base})
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	if at("") != k0 {
		t.Error("the origin's root repository changed its content keys")
	}
	if at("/a") == k0 || at("/a") == at("/b") {
		t.Error("repositories at different paths of one origin share content keys")
	}
}

func mustURL(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// Content keys are stored: a change to how they are computed must change keyVersion, never the
// value of an existing key silently. These are keys of keyVersion 2.
func TestContentKeysAreStable(t *testing.T) {
	cmd := &wire.CommandRequest{Name: "manifestdata", Args: map[string]any{"fields": wire.Set("parents", "revision"),
		"haveparents": true, "nodes": []any{"01234567890123456789"}, "tree": ""}}
	for _, c := range []struct{ repoID, repoPath, want string }{
		{"https://hg.example.com/repo", "", "ea4a4161e8fec94db13324f27cc0933f37e2bfdaa272c026eadb15e2b485ab41"},
		{"https://hg.example.com/", "/repos/r1", "5c5941399fc44c89755ac0db7584ba953d2dfad41246aa761153c5ca042df0fa"},
	} {
		got, err := ContentKeyAt(c.repoID, c.repoPath, cmd)
		if err != nil || got != c.want {
			t.Errorf("key of %s%s = %s, %v; want %s", c.repoID, c.repoPath, got, err, c.want)
		}
	}
}

// The key from a remembered frame is the hash of the whole input encoded at once, for any
// arguments, repositories and commands (and again once the memory of frames has started over).
func TestContentKeyFramesMatchTheWholeEncoding(t *testing.T) {
	argSets := []map[string]any{
		nil, {},
		{"nodes": []any{"a", "b"}, "tree": "", "fields": wire.Set("revision", "parents")},
		{"revisions": []any{map[string]any{"type": "changesetdagrange", "roots": []any{}, "heads": []any{"h"}}},
			"pathfilter": map[string]any{"include": []any{"path:ü"}}, "haveparents": false},
		{"args": "a key named args", "zzzz": uint64(1 << 40), "": -3},
	}
	for i := 0; i < 2*maxKeyFrames+10; i++ {
		repoPath := ""
		if i%3 != 0 {
			repoPath = fmt.Sprintf("/r%d", i)
		}
		cmd := &wire.CommandRequest{Name: []string{"manifestdata", "filesdata", "filedata"}[i%3], Args: argSets[i%len(argSets)]}
		args := cmd.Args
		if args == nil {
			args = map[string]any{}
		}
		whole, err := keyInput("repo", repoPath, cmd.Name, args)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(whole)
		got, err := ContentKeyAt("repo", repoPath, cmd)
		if err != nil || got != hex.EncodeToString(sum[:]) {
			t.Fatalf("%s at %q with %v: key %s, %v; the whole encoding hashes to %x", cmd.Name, repoPath, cmd.Args, got, err, sum)
		}
	}
}
