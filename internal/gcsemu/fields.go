package gcsemu

import (
	"slices"
	"strings"
)

// SelectListed keeps, in each item of a listing page, only the attributes a `fields` parameter
// selects for items (`items(name,size,generation),nextPageToken`), as GCS does; fake-gcs-server
// ignores the parameter and sends every attribute. Fronts that stand in for GCS in tests and
// benchmarks apply it, so that a client which leaves out an attribute it reads is caught. Without
// an items(...) selection the items are left whole.
func SelectListed(fields string, items []map[string]any) {
	open := strings.Index(fields, "items(")
	if open < 0 {
		return
	}
	sel := fields[open+len("items("):]
	end := strings.IndexByte(sel, ')')
	if end < 0 {
		return
	}
	keep := strings.Split(sel[:end], ",")
	for _, it := range items {
		for k := range it {
			if !slices.Contains(keep, k) {
				delete(it, k)
			}
		}
	}
}
