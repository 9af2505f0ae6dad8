// Package deploy holds no code of Detour's: it is the home of the deployment artefacts (systemd
// units, Kubernetes manifests, Prometheus alerts, a Grafana dashboard) and of the tests that check
// them against the Kubernetes API types, Prometheus's own parsers and Detour's sources. It is a
// module of its own so that kustomize, the Kubernetes API and Prometheus stay out of the root
// module's dependencies.
package deploy
