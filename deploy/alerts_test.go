package deploy

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
)

var promql = parser.NewParser(parser.Options{})

// selectorName returns the metric name a selector fixes, or "".
func selectorName(matchers []*labels.Matcher) string {
	for _, m := range matchers {
		if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
			return m.Value
		}
	}
	return ""
}

// metricNames parses a PromQL expression and returns the metric names its selectors use.
func metricNames(expr string) ([]string, error) {
	e, err := promql.ParseExpr(expr)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, matchers := range parser.ExtractSelectors(e) {
		names = append(names, selectorName(matchers))
	}
	return names, nil
}

// exprProblems returns why an expression is wrong: it does not parse; it selects a metric
// Detour does not export, or a label that metric does not have; or it groups or matches on a
// label none of its metrics has.
func exprProblems(expr string, known knownSeries) []error {
	e, err := promql.ParseExpr(expr)
	if err != nil {
		return []error{err}
	}
	var errs []error
	used := map[string]bool{} // labels of every metric the expression selects
	var grouping []string
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		switch n := n.(type) {
		case *parser.VectorSelector:
			name := selectorName(n.LabelMatchers)
			lbls, ok := known[name]
			switch {
			case name == "":
				errs = append(errs, fmt.Errorf("selector %s has no fixed metric name, so it cannot be checked", n))
				return nil
			case !ok:
				errs = append(errs, fmt.Errorf("metric %s is not exported by Detour's code (../internal)", name))
				return nil
			}
			for _, m := range n.LabelMatchers {
				if m.Name != labels.MetricName && !lbls[m.Name] {
					errs = append(errs, fmt.Errorf("%s has no label %s", name, m.Name))
				}
			}
			maps.Copy(used, lbls)
		case *parser.AggregateExpr:
			grouping = append(grouping, n.Grouping...)
		case *parser.BinaryExpr:
			if n.VectorMatching != nil {
				grouping = append(grouping, n.VectorMatching.MatchingLabels...)
				grouping = append(grouping, n.VectorMatching.Include...)
			}
		}
		return nil
	})
	if len(used) == 0 && len(errs) == 0 {
		errs = append(errs, errors.New("uses no metric"))
	}
	for _, l := range grouping {
		if len(used) > 0 && !used[l] {
			errs = append(errs, fmt.Errorf("groups or matches on label %s, which none of its metrics has", l))
		}
	}
	return errs
}

func checkExpr(t *testing.T, where, expr string, known knownSeries) {
	t.Helper()
	for _, err := range exprProblems(expr, known) {
		t.Errorf("%s: %v\n%s", where, err, expr)
	}
}

func TestAlertRulesParseAndUseExportedMetrics(t *testing.T) {
	known := exportedMetrics(t)
	groups, errs := rulefmt.ParseFile("prometheus/alerts.yaml", false, model.LegacyValidation, promql, slog.New(slog.DiscardHandler))
	for _, err := range errs {
		t.Errorf("rulefmt: %v", err)
	}
	if groups == nil || len(groups.Groups) == 0 {
		t.Fatal("no rule groups")
	}
	seen := map[string]bool{}
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			where := g.Name + "/" + r.Alert + r.Record
			if r.Record != "" {
				t.Errorf("%s: recording rules would need their names added to the known metrics", where)
				continue
			}
			if seen[r.Alert] {
				t.Errorf("%s: alert name used twice", where)
			}
			seen[r.Alert] = true
			if s := r.Labels["severity"]; s != "critical" && s != "warning" {
				t.Errorf("%s: severity %q, want critical or warning", where, s)
			}
			for _, a := range []string{"summary", "description"} {
				if r.Annotations[a] == "" {
					t.Errorf("%s: no %s annotation", where, a)
				}
			}
			checkExpr(t, where, r.Expr, known)
		}
	}
	// What the alerts must cover, by metric.
	var all []string
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			names, _ := metricNames(r.Expr)
			all = append(all, names...)
		}
	}
	for _, m := range []string{
		"detour_agent_place_failures_total", "detour_agent_requests_total", "detour_snapshot_age_seconds",
		"detour_agent_fills_total", "detour_fill_reports_total", "detour_place_decisions_total",
		"detour_target_healthy", "detour_reconcile_missing_objects_total", "detour_reconcile_refused_total",
		"detour_etcd_alarm", "detour_etcd_db_size_bytes", "detour_etcd_compactions_total",
	} {
		if !slices.Contains(all, m) {
			t.Errorf("no alert uses %s", m)
		}
	}
}

// TestMetricCheckRejectsUnknownNamesAndLabels proves the check of expressions is not vacuous.
func TestMetricCheckRejectsUnknownNamesAndLabels(t *testing.T) {
	known := exportedMetrics(t)
	for _, expr := range []string{
		`rate(detour_agent_request_total[5m]) > 0`,                     // misspelt: requests
		`detour_place_duration_seconds > 1`,                            // a histogram exports _bucket, _sum, _count
		`sum(rate(detour_fill_reports_total[5m])) by (x`,               // does not parse
		`rate(detour_agent_requests_total{outcom="redirect"}[5m]) > 0`, // misspelt label: outcome
		`sum by (reason) (rate(detour_agent_fills_total[5m])) > 0`,     // a label of another metric
		`{__name__=~"detour_.*"}`,                                      // no fixed name
	} {
		if len(exprProblems(expr, known)) == 0 {
			t.Errorf("the check accepted %s", expr)
		}
	}
}

// dashboard is the part of a Grafana dashboard the checks read.
type dashboard struct {
	Title      string  `json:"title"`
	UID        string  `json:"uid"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []struct {
			Name       string          `json:"name"`
			Type       string          `json:"type"`
			Query      json.RawMessage `json:"query"`
			Definition string          `json:"definition"`
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int    `json:"id"`
	Type       string `json:"type"`
	Title      string `json:"title"`
	Datasource *struct {
		UID string `json:"uid"`
	} `json:"datasource"`
	GridPos struct{ H, W, X, Y int } `json:"gridPos"`
	Targets []struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a collapsed row's
}

// grafanaVars replaces Grafana's variables with values PromQL accepts: intervals with a duration,
// the others (inside label matchers) with a regular expression.
var grafanaVars = regexp.MustCompile(`\$(?:\{[A-Za-z_]\w*(?::\w+)?\}|[A-Za-z_]\w*)`)

func expandGrafanaVars(expr string) string {
	return grafanaVars.ReplaceAllStringFunc(expr, func(v string) string {
		switch strings.Trim(v, "${}") {
		case "__rate_interval", "__interval", "__range":
			return "5m"
		}
		return ".*"
	})
}

// labelValues matches label_values(expr, label) in template variable queries.
var labelValues = regexp.MustCompile(`^label_values\((.+),\s*\w+\)$`)

func TestGrafanaDashboardQueriesUseExportedMetrics(t *testing.T) {
	known := exportedMetrics(t)
	b, err := os.ReadFile("grafana/detour.json")
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("grafana/detour.json: %v", err)
	}
	if d.UID == "" || d.Title == "" {
		t.Error("the dashboard needs a uid and a title")
	}
	vars := map[string]bool{}
	for _, v := range d.Templating.List {
		vars[v.Name] = true
		if v.Type != "query" {
			continue
		}
		m := labelValues.FindStringSubmatch(v.Definition)
		if m == nil {
			t.Errorf("variable %s: query %q is not label_values(metric, label)", v.Name, v.Definition)
			continue
		}
		checkExpr(t, "variable "+v.Name, expandGrafanaVars(m[1]), known)
	}
	if !vars["datasource"] {
		t.Error("no datasource variable: panels would be bound to one Prometheus")
	}
	ids := map[int]bool{}
	var boxes []panel
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			where := fmt.Sprintf("panel %d %q", p.ID, p.Title)
			if ids[p.ID] {
				t.Errorf("%s: id used twice", where)
			}
			ids[p.ID] = true
			if g := p.GridPos; g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
				t.Errorf("%s: gridPos %+v is outside the 24 columns", where, g)
			}
			boxes = append(boxes, p)
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
				t.Errorf("%s: datasource is not ${datasource}", where)
			}
			if len(p.Targets) == 0 {
				t.Errorf("%s: no query", where)
			}
			for _, q := range p.Targets {
				for _, v := range grafanaVars.FindAllString(q.Expr, -1) {
					if name := strings.Trim(v, "${}"); !strings.HasPrefix(name, "__") && !vars[name] {
						t.Errorf("%s: query %s uses undefined variable %s", where, q.RefID, v)
					}
				}
				checkExpr(t, where+" query "+q.RefID, expandGrafanaVars(q.Expr), known)
			}
		}
	}
	walk(d.Panels)
	for i, a := range boxes {
		for _, b := range boxes[i+1:] {
			if a.GridPos.X < b.GridPos.X+b.GridPos.W && b.GridPos.X < a.GridPos.X+a.GridPos.W &&
				a.GridPos.Y < b.GridPos.Y+b.GridPos.H && b.GridPos.Y < a.GridPos.Y+a.GridPos.H {
				t.Errorf("panels %d and %d overlap", a.ID, b.ID)
			}
		}
	}
}
