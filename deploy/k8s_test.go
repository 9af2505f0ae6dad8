package deploy

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/resmap"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// namespace is where every object of the manifests lives.
const namespace = "detour"

// regions are the overlays and the region each one sets.
var regions = map[string]string{"us": "us-east1", "eu": "europe-west1"}

// kinds maps apiVersion/kind to the Go type a rendered object must decode into. A kind missing
// here fails the test: add its type rather than let it through unchecked.
var kinds = map[string]func() any{
	"v1/Namespace":                            func() any { return &corev1.Namespace{} },
	"v1/ServiceAccount":                       func() any { return &corev1.ServiceAccount{} },
	"v1/ConfigMap":                            func() any { return &corev1.ConfigMap{} },
	"v1/Secret":                               func() any { return &corev1.Secret{} },
	"v1/Service":                              func() any { return &corev1.Service{} },
	"v1/PersistentVolumeClaim":                func() any { return &corev1.PersistentVolumeClaim{} },
	"apps/v1/Deployment":                      func() any { return &appsv1.Deployment{} },
	"apps/v1/StatefulSet":                     func() any { return &appsv1.StatefulSet{} },
	"policy/v1/PodDisruptionBudget":           func() any { return &policyv1.PodDisruptionBudget{} },
	"networking.k8s.io/v1/NetworkPolicy":      func() any { return &networkingv1.NetworkPolicy{} },
	"monitoring.coreos.com/v1/ServiceMonitor": func() any { return &serviceMonitor{} },
	"cert-manager.io/v1/Certificate":          func() any { return &certificate{} },
	"cert-manager.io/v1/Issuer":               func() any { return &issuer{} },
}

// object is one rendered object, decoded into its type.
type object struct {
	id  string // kind/namespace/name, for messages
	obj any
}

// render builds the kustomization in dir as `kustomize build` does.
func render(dir string) (resmap.ResMap, error) {
	return krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
}

// decode turns every rendered object into its Go type as the API server's strict field validation
// does: an unknown field, a field in the wrong case, a duplicate field or a malformed value (a
// quantity, a duration) is an error. Custom resources also check their required fields.
func decode(m resmap.ResMap) ([]object, error) {
	var objs []object
	var errs []error
	for _, r := range m.Resources() {
		id := fmt.Sprintf("%s/%s/%s", r.GetKind(), r.GetNamespace(), r.GetName())
		newObj, ok := kinds[r.GetApiVersion()+"/"+r.GetKind()]
		if !ok {
			errs = append(errs, fmt.Errorf("%s: no Go type for %s %s: add one to kinds", id, r.GetApiVersion(), r.GetKind()))
			continue
		}
		y, err := r.AsYAML()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", id, err))
			continue
		}
		// As kubectl reads what kustomize prints: YAML to JSON, duplicate keys refused.
		j, err := yaml.YAMLToJSONStrict(y)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", id, err))
			continue
		}
		obj := newObj()
		strict, err := kjson.UnmarshalStrict(j, obj)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", id, err))
			continue
		}
		for _, e := range strict {
			errs = append(errs, fmt.Errorf("%s: %w", id, e))
		}
		if c, ok := obj.(checker); ok {
			if err := c.check(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", id, err))
			}
		}
		objs = append(objs, object{id: id, obj: obj})
	}
	return objs, errors.Join(errs...)
}

// layout is one way to deploy a region: an overlay alone, or with components.
type layout struct {
	name       string
	components []string
	extra      string // more kustomization lines
}

func (l layout) uses(component string) bool { return slices.Contains(l.components, component) }

var layouts = []layout{
	{name: "alone"},
	{name: "cert-manager", components: []string{"cert-manager", "cert-manager-etcd"}},
	{name: "external-etcd", components: []string{"external-etcd"}, extra: externalEndpoints},
	{name: "external-etcd+cert-manager", components: []string{"external-etcd", "cert-manager"}, extra: externalEndpoints},
}

const externalEndpoints = `
configMapGenerator:
  - name: detour-controlplane-config
    behavior: merge
    literals:
      - etcd-endpoints=https://etcd-a.example.internal:2379,https://etcd-b.example.internal:2379
`

// workspace copies the manifests to a temporary directory, so that tests can add kustomizations
// beside them (kustomize loads nothing from outside a kustomization's tree, nor from an absolute
// path).
func workspace(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "k8s")
	if err := os.CopyFS(dir, os.DirFS("k8s")); err != nil {
		t.Fatal(err)
	}
	return dir
}

// compose writes a kustomization over ../overlays/<region> with the layout's components and
// returns its directory.
func compose(t *testing.T, ws, region string, l layout, more string) string {
	t.Helper()
	dir := filepath.Join(ws, "compose-"+region+"-"+l.name)
	var b strings.Builder
	b.WriteString("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../overlays/" + region + "\n")
	if len(l.components) > 0 {
		b.WriteString("components:\n")
		for _, c := range l.components {
			b.WriteString("  - ../components/" + c + "\n")
		}
	}
	b.WriteString(l.extra)
	b.WriteString(more)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestOverlaysRenderToValidObjects(t *testing.T) {
	ws := workspace(t)
	for region, regionName := range regions {
		for _, l := range layouts {
			t.Run(region+"/"+l.name, func(t *testing.T) {
				dir := filepath.Join("k8s", "overlays", region)
				if len(l.components) > 0 {
					dir = compose(t, ws, region, l, "")
				}
				m, err := render(dir)
				if err != nil {
					t.Fatalf("render %s: %v", dir, err)
				}
				objs, err := decode(m)
				if err != nil {
					t.Fatalf("decode %s:\n%v", dir, err)
				}
				checkManifests(t, newIndex(objs), regionName, l)
			})
		}
	}
}

// TestStrictDecodingRejectsMisspeltFields proves that the check above would catch a typo: each
// case renders an overlay with one deliberate mistake, which must fail decoding with an error
// that names it.
func TestStrictDecodingRejectsMisspeltFields(t *testing.T) {
	ws := workspace(t)
	cases := []struct {
		name       string
		components []string
		patch      string
		want       string
	}{
		{
			name: "misspelt container field",
			patch: `
apiVersion: apps/v1
kind: Deployment
metadata:
  name: detour-controlplane
spec:
  template:
    spec:
      containers:
        - name: controlplane
          readinesProbe:
            grpc:
              port: 7700
`,
			want: `unknown field "spec.template.spec.containers[0].readinesProbe"`,
		},
		{
			name: "field in the wrong case",
			patch: `
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: detour-etcd
spec:
  ServiceName: detour-etcd
`,
			want: `"spec.ServiceName"`,
		},
		{
			name: "malformed quantity",
			patch: `
apiVersion: apps/v1
kind: Deployment
metadata:
  name: detour-origin
spec:
  template:
    spec:
      containers:
        - name: agent
          resources:
            limits:
              memory: 1Gx
`,
			want: "quantities must match",
		},
		{
			name: "misspelt ServiceMonitor field",
			patch: `
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: detour-agent
spec:
  endpoint:
    - port: metrics
`,
			want: `unknown field "spec.endpoint"`,
		},
		{
			name:       "misspelt Certificate field",
			components: []string{"cert-manager"},
			patch: `
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: detour-controlplane
  namespace: detour
spec:
  dnsName:
    - detour-controlplane
`,
			want: `unknown field "spec.dnsName"`,
		},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			patch := "patches:\n  - patch: |-\n" + indent(strings.TrimPrefix(c.patch, "\n"), "      ")
			dir := compose(t, ws, "us", layout{name: fmt.Sprint("broken", i), components: c.components}, patch)
			m, err := render(dir)
			if err != nil {
				t.Fatalf("render %s: %v", dir, err)
			}
			_, err = decode(m)
			if err == nil {
				t.Fatalf("decoding accepted the mistake; want an error containing %q", c.want)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("decoding failed, but not on the mistake:\n%v\nwant an error containing %q", err, c.want)
			}
		})
	}
}

func indent(s, prefix string) string {
	lines := strings.Split(strings.TrimSuffix(s, "\n"), "\n")
	for i, l := range lines {
		lines[i] = prefix + l
	}
	return strings.Join(lines, "\n") + "\n"
}

// index is one rendering's objects by type.
type index struct {
	all          []object
	workloads    []workload
	services     []*corev1.Service
	configMaps   map[string]*corev1.ConfigMap
	claims       []*corev1.PersistentVolumeClaim
	pdbs         []*policyv1.PodDisruptionBudget
	monitors     []*serviceMonitor
	certificates []*certificate
	statefulSets map[string]*appsv1.StatefulSet
	deployments  map[string]*appsv1.Deployment
}

// workload is a Deployment or StatefulSet, by what the checks need of either.
type workload struct {
	id       string
	replicas int32
	selector *metav1.LabelSelector
	pod      corev1.PodTemplateSpec
}

func newIndex(objs []object) *index {
	x := &index{all: objs, configMaps: map[string]*corev1.ConfigMap{},
		statefulSets: map[string]*appsv1.StatefulSet{}, deployments: map[string]*appsv1.Deployment{}}
	for _, o := range objs {
		switch v := o.obj.(type) {
		case *appsv1.Deployment:
			x.deployments[v.Name] = v
			x.workloads = append(x.workloads, workload{o.id, deref(v.Spec.Replicas, 1), v.Spec.Selector, v.Spec.Template})
		case *appsv1.StatefulSet:
			x.statefulSets[v.Name] = v
			x.workloads = append(x.workloads, workload{o.id, deref(v.Spec.Replicas, 1), v.Spec.Selector, v.Spec.Template})
		case *corev1.Service:
			x.services = append(x.services, v)
		case *corev1.ConfigMap:
			x.configMaps[v.Name] = v
		case *corev1.PersistentVolumeClaim:
			x.claims = append(x.claims, v)
		case *policyv1.PodDisruptionBudget:
			x.pdbs = append(x.pdbs, v)
		case *serviceMonitor:
			x.monitors = append(x.monitors, v)
		case *certificate:
			x.certificates = append(x.certificates, v)
		}
	}
	return x
}

func deref[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

// selects reports whether a label selector selects pods with these labels (an empty selector
// selects nothing here: none of the manifests means "everything").
func selects(sel *metav1.LabelSelector, lbls map[string]string) bool {
	if sel == nil || len(sel.MatchLabels)+len(sel.MatchExpressions) == 0 {
		return false
	}
	s, err := metav1.LabelSelectorAsSelector(sel)
	return err == nil && s.Matches(labels.Set(lbls))
}

// selected returns the workloads whose pods a selector selects.
func (x *index) selected(sel *metav1.LabelSelector) []workload {
	var ws []workload
	for _, w := range x.workloads {
		if selects(sel, w.pod.Labels) {
			ws = append(ws, w)
		}
	}
	return ws
}

// configMap returns the ConfigMap generated from name (kustomize appends a content hash).
func (x *index) configMap(t *testing.T, name string) *corev1.ConfigMap {
	t.Helper()
	for n, cm := range x.configMaps {
		if strings.HasPrefix(n, name+"-") {
			return cm
		}
	}
	t.Fatalf("no ConfigMap generated from %s", name)
	return nil
}

func checkManifests(t *testing.T, x *index, region string, l layout) {
	for _, o := range x.all {
		if _, isNS := o.obj.(*corev1.Namespace); isNS {
			continue
		}
		if ns := o.obj.(metav1.Object).GetNamespace(); ns != namespace {
			t.Errorf("%s: namespace %q, want %q", o.id, ns, namespace)
		}
	}
	certSecrets := map[string]bool{}
	for _, c := range x.certificates {
		certSecrets[c.Spec.SecretName] = true
	}
	for _, w := range x.workloads {
		checkWorkload(t, x, w, l, certSecrets)
	}
	for _, c := range x.claims {
		checkClaim(t, "PersistentVolumeClaim "+c.Name, c.Spec)
	}
	checkServices(t, x)
	checkControlPlane(t, x)
	checkEtcd(t, x, l)
	for _, name := range []string{"detour-controlplane-config", "detour-agent-config"} {
		if got := x.configMap(t, name).Data["region"]; got != region {
			t.Errorf("%s: region %q, want %q", name, got, region)
		}
	}
}

// varRef matches the $(VAR) references Kubernetes expands in command and args.
var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

func checkWorkload(t *testing.T, x *index, w workload, l layout, certSecrets map[string]bool) {
	t.Helper()
	pod := w.pod.Spec
	if !selects(w.selector, w.pod.Labels) {
		t.Errorf("%s: selector %v does not select its own pods %v", w.id, w.selector, w.pod.Labels)
	}
	// Pod security standard "restricted", which the namespace enforces.
	if sc := pod.SecurityContext; sc == nil || !deref(sc.RunAsNonRoot, false) || sc.SeccompProfile == nil ||
		sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: pod needs runAsNonRoot and the RuntimeDefault seccomp profile", w.id)
	}
	for _, v := range pod.Volumes {
		switch {
		case v.ConfigMap != nil:
			if x.configMaps[v.ConfigMap.Name] == nil {
				t.Errorf("%s: volume %s names ConfigMap %s, which is not rendered", w.id, v.Name, v.ConfigMap.Name)
			}
		case v.Secret != nil:
			// Secret files are root's; a mode without "other" read needs the pod's fsGroup.
			if deref(v.Secret.DefaultMode, 0o644)&0o004 == 0 && (pod.SecurityContext == nil || pod.SecurityContext.FSGroup == nil) {
				t.Errorf("%s: volume %s (mode %#o) is unreadable without a pod fsGroup", w.id, v.Name, *v.Secret.DefaultMode)
			}
			etcdSecret := strings.HasPrefix(v.Secret.SecretName, "detour-etcd-")
			if l.uses("cert-manager") && (!etcdSecret || l.uses("cert-manager-etcd")) && !certSecrets[v.Secret.SecretName] {
				t.Errorf("%s: Secret %s is issued by no Certificate", w.id, v.Secret.SecretName)
			}
		}
	}
	for _, c := range pod.Containers {
		where := w.id + " container " + c.Name
		sc := c.SecurityContext
		if sc == nil || deref(sc.AllowPrivilegeEscalation, true) || !deref(sc.ReadOnlyRootFilesystem, false) ||
			sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
			t.Errorf("%s: needs allowPrivilegeEscalation false, a read-only root filesystem, and capabilities dropped", where)
		}
		for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
			if _, ok := c.Resources.Requests[r]; !ok {
				t.Errorf("%s: no %s request", where, r)
			}
			if _, ok := c.Resources.Limits[r]; !ok {
				t.Errorf("%s: no %s limit", where, r)
			}
		}
		if i := strings.LastIndex(c.Image, ":"); i < strings.LastIndex(c.Image, "/") || strings.HasSuffix(c.Image, ":latest") {
			t.Errorf("%s: image %q has no fixed tag", where, c.Image)
		}
		env := map[string]bool{}
		for _, e := range c.Env {
			env[e.Name] = true
			if e.ValueFrom != nil && e.ValueFrom.ConfigMapKeyRef != nil {
				ref := e.ValueFrom.ConfigMapKeyRef
				if cm := x.configMaps[ref.Name]; cm == nil {
					t.Errorf("%s: env %s names ConfigMap %s, which is not rendered", where, e.Name, ref.Name)
				} else if _, ok := cm.Data[ref.Key]; !ok {
					t.Errorf("%s: env %s names key %s, which ConfigMap %s lacks", where, e.Name, ref.Key, ref.Name)
				}
			}
		}
		for _, a := range slices.Concat(c.Command, c.Args) {
			for _, m := range varRef.FindAllStringSubmatch(a, -1) {
				if !env[m[1]] {
					t.Errorf("%s: argument %q refers to $(%s), which the container's env does not define", where, a, m[1])
				}
			}
		}
		if binary := detourBinary(c.Image); binary != "" {
			flags := checkFlags(t, where, binary, c.Args, binaryFlags(t, binary))
			checkShutdown(t, where, flags["shutdown-timeout"], c.Lifecycle, pod.TerminationGracePeriodSeconds)
		}
	}
}

// detourBinary returns the cmd/ directory an image of Detour's is built from, or "".
func detourBinary(image string) string {
	name, _, _ := strings.Cut(image[strings.LastIndex(image, "/")+1:], ":")
	if b, ok := strings.CutPrefix(name, "detour-"); ok {
		return b
	}
	return ""
}

// checkShutdown checks that a pod gives a Detour process the whole of its --shutdown-timeout,
// after the preStop hook, before the kubelet kills it.
func checkShutdown(t *testing.T, where, timeout string, lc *corev1.Lifecycle, grace *int64) {
	t.Helper()
	d, err := time.ParseDuration(timeout)
	if err != nil {
		t.Errorf("%s: --shutdown-timeout %q: %v", where, timeout, err)
		return
	}
	var preStop time.Duration
	if lc != nil && lc.PreStop != nil && lc.PreStop.Sleep != nil {
		preStop = time.Duration(lc.PreStop.Sleep.Seconds) * time.Second
	}
	if g := time.Duration(deref(grace, 30)) * time.Second; g < preStop+d {
		t.Errorf("%s: terminationGracePeriodSeconds %s is shorter than preStop %s + --shutdown-timeout %s", where, g, preStop, d)
	}
}

func checkServices(t *testing.T, x *index) {
	t.Helper()
	for _, s := range x.services {
		ws := x.selected(&metav1.LabelSelector{MatchLabels: s.Spec.Selector})
		if len(ws) == 0 {
			t.Errorf("Service %s selects no workload's pods", s.Name)
			continue
		}
		for _, p := range s.Spec.Ports {
			if !exposes(ws, p.TargetPort) {
				t.Errorf("Service %s: port %s targets %s, which no selected container exposes", s.Name, p.Name, p.TargetPort.String())
			}
		}
	}
	for _, p := range x.pdbs {
		if len(x.selected(p.Spec.Selector)) == 0 {
			t.Errorf("PodDisruptionBudget %s selects no workload's pods", p.Name)
		}
	}
	for _, m := range x.monitors {
		var matched []*corev1.Service
		for _, s := range x.services {
			if selects(&m.Spec.Selector, s.Labels) {
				matched = append(matched, s)
			}
		}
		if len(matched) == 0 {
			t.Errorf("ServiceMonitor %s selects no Service", m.Name)
		}
		for _, s := range matched {
			for _, e := range m.Spec.Endpoints {
				if !slices.ContainsFunc(s.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == e.Port }) {
					t.Errorf("ServiceMonitor %s: Service %s has no port named %q", m.Name, s.Name, e.Port)
				}
			}
			if m.Spec.JobLabel != "" && s.Labels[m.Spec.JobLabel] == "" {
				t.Errorf("ServiceMonitor %s: Service %s has no label %s for the job name", m.Name, s.Name, m.Spec.JobLabel)
			}
		}
	}
}

// exposes reports whether every selected workload has a container port that port names.
func exposes(ws []workload, port intstr.IntOrString) bool {
	for _, w := range ws {
		found := false
		for _, c := range w.pod.Spec.Containers {
			for _, cp := range c.Ports {
				if (port.Type == intstr.String && cp.Name == port.StrVal) || (port.Type == intstr.Int && cp.ContainerPort == port.IntVal) {
					found = true
				}
			}
		}
		if !found {
			return false
		}
	}
	return true
}

func checkControlPlane(t *testing.T, x *index) {
	t.Helper()
	d := x.deployments["detour-controlplane"]
	if d == nil {
		t.Fatal("no Deployment detour-controlplane")
	}
	if r := deref(d.Spec.Replicas, 1); r != 3 {
		t.Errorf("control plane: %d replicas, want 3", r)
	}
	pod := d.Spec.Template.Spec
	if pod.Affinity == nil || pod.Affinity.PodAntiAffinity == nil {
		t.Error("control plane: no podAntiAffinity")
	}
	if !slices.ContainsFunc(x.pdbs, func(p *policyv1.PodDisruptionBudget) bool {
		return selects(p.Spec.Selector, d.Spec.Template.Labels)
	}) {
		t.Error("control plane: no PodDisruptionBudget")
	}
	for _, c := range pod.Containers {
		if c.Name != "controlplane" {
			continue
		}
		for name, p := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
			if p == nil || p.GRPC == nil || p.GRPC.Port != 7700 {
				t.Errorf("control plane: %s probe is not gRPC health on port 7700", name)
			}
		}
		// A replica is not ready while it loads its snapshot, however long that takes; probes
		// that kill must ask whether it is alive (controlplane.LivenessService), or a large index
		// would crash-loop it.
		const liveness = "liveness"
		for name, p := range map[string]*corev1.Probe{"startup": c.StartupProbe, "liveness": c.LivenessProbe} {
			if p != nil && p.GRPC != nil && (p.GRPC.Service == nil || *p.GRPC.Service != liveness) {
				t.Errorf("control plane: the %s probe asks for readiness, not service %q", name, liveness)
			}
		}
		if p := c.ReadinessProbe; p != nil && p.GRPC != nil && p.GRPC.Service != nil && *p.GRPC.Service != "" {
			t.Errorf("control plane: the readiness probe asks for service %q, not readiness", *p.GRPC.Service)
		}
		flags, _ := flagArgs(c.Args)
		if flags["listen"] != "0.0.0.0:7700" || flags["metrics-listen"] != "0.0.0.0:7701" {
			t.Errorf("control plane listens on %q and %q, want 0.0.0.0:7700 and 0.0.0.0:7701", flags["listen"], flags["metrics-listen"])
		}
	}
	o := x.deployments["detour-origin"]
	if o == nil {
		t.Fatal("no Deployment detour-origin")
	}
	for _, c := range o.Spec.Template.Spec.Containers {
		if c.Name != "agent" {
			continue
		}
		flags, _ := flagArgs(c.Args)
		if flags["listen"] != "0.0.0.0:8080" || flags["metrics-listen"] != "0.0.0.0:8081" || !strings.HasPrefix(flags["origin"], "http://127.0.0.1:") {
			t.Errorf("agent: --listen %q, --metrics-listen %q, --origin %q; want 0.0.0.0:8080, 0.0.0.0:8081 and the origin on loopback",
				flags["listen"], flags["metrics-listen"], flags["origin"])
		}
		if _, set := flags["gcs-endpoint"]; set {
			t.Error("agent: --gcs-endpoint is for emulators; production uses GCS")
		}
	}
}

func checkEtcd(t *testing.T, x *index, l layout) {
	t.Helper()
	endpoints := x.configMap(t, "detour-controlplane-config").Data["etcd-endpoints"]
	s := x.statefulSets["detour-etcd"]
	if l.uses("external-etcd") {
		if s != nil || strings.Contains(endpoints, "detour-etcd") {
			t.Errorf("external etcd: the in-cluster etcd is still there (StatefulSet %v, endpoints %q)", s != nil, endpoints)
		}
		return
	}
	if s == nil {
		t.Fatal("no StatefulSet detour-etcd")
	}
	replicas := deref(s.Spec.Replicas, 1)
	if replicas != 3 {
		t.Errorf("etcd: %d members, want 3", replicas)
	}
	if len(s.Spec.VolumeClaimTemplates) == 0 {
		t.Error("etcd: no volumeClaimTemplates")
	}
	for _, c := range s.Spec.VolumeClaimTemplates {
		checkClaim(t, "etcd: volumeClaimTemplate "+c.Name, c.Spec)
	}
	headless := slices.ContainsFunc(x.services, func(svc *corev1.Service) bool {
		return svc.Name == s.Spec.ServiceName && svc.Spec.ClusterIP == corev1.ClusterIPNone
	})
	if !headless {
		t.Errorf("etcd: serviceName %q is not a headless Service", s.Spec.ServiceName)
	}
	flags, _ := flagArgs(s.Spec.Template.Spec.Containers[0].Args)
	for i := range replicas {
		member := fmt.Sprintf("%s-%d.%s", s.Name, i, s.Spec.ServiceName)
		if !strings.Contains(endpoints, "https://"+member+":2379") {
			t.Errorf("etcd: the control plane's endpoints %q lack member %s", endpoints, member)
		}
		if !strings.Contains(flags["initial-cluster"], fmt.Sprintf("%s-%d=https://%s:2380", s.Name, i, member)) {
			t.Errorf("etcd: --initial-cluster %q lacks member %s", flags["initial-cluster"], member)
		}
	}
}

// checkClaim catches a claim a patch has emptied (a strategic merge replaces a list it has no merge
// key for, such as volumeClaimTemplates).
func checkClaim(t *testing.T, where string, spec corev1.PersistentVolumeClaimSpec) {
	t.Helper()
	if len(spec.AccessModes) == 0 {
		t.Errorf("%s: no accessModes", where)
	}
	if q, ok := spec.Resources.Requests[corev1.ResourceStorage]; !ok || q.IsZero() {
		t.Errorf("%s: no storage request", where)
	}
}
