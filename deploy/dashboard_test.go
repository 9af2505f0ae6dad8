package deploy

import (
	"encoding/json"
	"os"
	"slices"
	"testing"

	"github.com/prometheus/prometheus/promql/parser"
)

// dashboardPanel returns the panel of the dashboard titled title.
func dashboardPanel(t *testing.T, title string) panel {
	t.Helper()
	b, err := os.ReadFile("grafana/detour.json")
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	var find func([]panel) *panel
	find = func(ps []panel) *panel {
		for i := range ps {
			if ps[i].Title == title {
				return &ps[i]
			}
			if p := find(ps[i].Panels); p != nil {
				return p
			}
		}
		return nil
	}
	p := find(d.Panels)
	if p == nil || len(p.Targets) != 1 {
		t.Fatalf("the dashboard has no panel %q with one query", title)
	}
	return *p
}

// sources returns the values of the source label that every selector of e admits, among the
// agent's byte sources, and the grouping labels of its aggregations.
func sources(t *testing.T, e parser.Expr) (admitted []string, grouping []string) {
	t.Helper()
	sels := parser.ExtractSelectors(e)
	if len(sels) == 0 {
		t.Fatalf("%s selects nothing", e)
	}
	for _, src := range []string{"store", "origin", "filled"} {
		all := true
		for _, matchers := range sels {
			if selectorName(matchers) != "detour_agent_response_bytes_total" {
				t.Fatalf("%s selects %s", e, selectorName(matchers))
			}
			for _, m := range matchers {
				if m.Name == "source" && !m.Matches(src) || m.Name == "job" && !m.Matches("detour-agent") {
					all = false
				}
			}
		}
		if all {
			admitted = append(admitted, src)
		}
	}
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		if a, ok := n.(*parser.AggregateExpr); ok {
			grouping = append(grouping, a.Grouping...)
		}
		return nil
	})
	return admitted, grouping
}

// The offload panels divide the bytes targets served by those and the bytes relayed from the
// origin (the fills' bytes left out), over the whole fleet and per command.
func TestDashboardShowsTheOffloadRatio(t *testing.T) {
	for _, c := range []struct {
		title    string
		grouping []string
	}{{"Offload ratio", nil}, {"Offload ratio by command", []string{"command"}}} {
		p := dashboardPanel(t, c.title)
		e, err := promql.ParseExpr(expandGrafanaVars(p.Targets[0].Expr))
		if err != nil {
			t.Fatal(err)
		}
		div, ok := e.(*parser.BinaryExpr)
		if !ok || div.Op != parser.DIV {
			t.Fatalf("%s: %s is not a ratio", c.title, e)
		}
		num, ng := sources(t, div.LHS)
		den, dg := sources(t, div.RHS)
		if !slices.Equal(num, []string{"store"}) || !slices.Equal(den, []string{"store", "origin"}) {
			t.Errorf("%s: %v / %v, want store / (store, origin)", c.title, num, den)
		}
		if !slices.Equal(ng, c.grouping) || !slices.Equal(dg, c.grouping) {
			t.Errorf("%s: grouped by %v / %v, want %v", c.title, ng, dg, c.grouping)
		}
	}
}
