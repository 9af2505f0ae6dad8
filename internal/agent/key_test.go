package agent

import (
	"context"
	"net/url"
	"testing"

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
	for _, cmd := range []string{"heads", "listkeys", "capabilities", "pushkey"} {
		if _, err := New(context.Background(), Config{Origin: mustURL(t, "http://127.0.0.1:1/"), Cacheable: []string{"filesdata", cmd}}); err == nil {
			t.Errorf("New accepted %q as cacheable", cmd)
		}
	}
	if _, err := New(context.Background(), Config{Origin: mustURL(t, "http://127.0.0.1:1/"), Cacheable: []string{"changesetdata"}}); err != nil {
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
