# Detour's build. Every tool the build needs is installed into ./bin at a pinned version.
BIN := $(CURDIR)/bin
export PATH := $(BIN):$(PATH)
GO ?= go

BUF_VERSION                := v1.75.0
PROTOC_GEN_GO_VERSION      := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2

TOOLS := $(BIN)/buf $(BIN)/protoc-gen-go $(BIN)/protoc-gen-go-grpc

.PHONY: all build test test-go test-chaos chaos deploy-check lint proto proto-check tools hg run bench bench-all fuzz clean

all: build

build:
	$(GO) build ./...

## test: every check that fits in CI, then every test with the race detector. The end-to-end
## tests need the real Mercurial that `make hg` installs (with CI=true its absence fails them).
test: hg lint proto-check test-go test-chaos deploy-check

## test-go: every package with the race detector, except chaos/, which test-chaos runs.
test-go:
	$(GO) test -race -count=1 -timeout 20m $$($(GO) list ./... | grep -v '/chaos$$')

## test-chaos: the short form of the chaos tests (about a minute and a half), without the race
## detector: they measure latency bounds of the real binaries, which the detector would slow.
test-chaos:
	$(GO) test -short -count=1 -v -timeout 10m ./chaos

## chaos: the long form of the chaos tests (see bench/RESULTS.md); one line of figures each.
chaos:
	DETOUR_CHAOS=full $(GO) test -count=1 -v -timeout 30m ./chaos

## deploy-check: render and check the deployment artefacts in deploy/ (a module of its own).
deploy-check:
	cd deploy && $(GO) test ./...

lint: $(TOOLS)
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); \
	  if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	buf lint

## proto: regenerate the committed Go code from api/proto.
proto: $(TOOLS)
	buf generate

## proto-check: fail if the committed generated code differs from a fresh generation.
proto-check: $(TOOLS)
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	  buf generate -o $$tmp && \
	  diff -r -x '*.proto' api/proto $$tmp/api/proto && echo "generated code is current"

tools: $(TOOLS)

## hg: Mercurial 5.6.1 (the last Debian release with wire protocol v2) into ./bin/hg, from Debian
## 11's packages, without touching the system's Python or packages.
hg:
	./hack/install-hg.sh

$(BIN)/buf:
	GOBIN=$(BIN) $(GO) install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
$(BIN)/protoc-gen-go:
	GOBIN=$(BIN) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
$(BIN)/protoc-gen-go-grpc:
	GOBIN=$(BIN) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

## run: the whole system on embedded defaults. HG_REPO=path serves that repository with a real
## hg serve (installed by `make hg`) instead of the demo origin. REGIONS=2 (or 3, or a list such as
## us,eu) runs a target and an agent in each of that many regions against one control plane.
REGION_LIST = $(if $(filter 2,$(REGIONS)),us$(comma)eu,$(if $(filter 3,$(REGIONS)),us$(comma)eu$(comma)ap,$(REGIONS)))
comma := ,
run:
	$(if $(HG_REPO),./hack/install-hg.sh && )$(GO) run ./cmd/devstack $(if $(HG_REPO),--hg-repo "$(HG_REPO)") $(if $(REGIONS),--regions $(REGION_LIST))

## bench: the harness (bench/harness): nginx `return 302`, the agent, the origin, misses and the
## Zipf runs, each against a baseline of the same run, into bench/RESULTS.md. Installs Debian's
## nginx and wrk when they are missing (as root). Then the placement decision (new against the
## replaced algorithm) and the index's bytes per object. About 5 minutes.
bench:
	@command -v nginx >/dev/null && command -v wrk >/dev/null || (apt-get update && apt-get install -y nginx wrk)
	$(GO) run ./bench/harness
	$(GO) test -run '^$$' -bench 'Decide/^targets=(10|100|1000)$$' -count 3 ./internal/placement
	$(GO) test -run '^$$' -bench IndexMemory -benchtime 1x ./internal/targets

## bench-all: Go benchmarks, then every load driver with its defaults (see bench/RESULTS.md).
bench-all:
	$(GO) test -run '^$$' -bench . -benchmem ./internal/...
	$(GO) run ./bench/placeload
	$(GO) run ./bench/placeload -misses -objects 1000
	$(GO) run ./bench/agentload
	$(GO) run ./bench/authload
	$(GO) run ./bench/integrityload
	$(GO) run ./bench/regionload -requests 100000

## fuzz: run each fuzz target for FUZZTIME (default 60s).
FUZZTIME ?= 60s
fuzz:
	for f in FuzzReadFrames FuzzDecodeCommandRequest FuzzRewriteRedirect FuzzReadResponse; do \
	  $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) ./internal/wire || exit 1; done
	for f in FuzzProtoRecordsDecodeAsProtoUnmarshalDoes FuzzDecodeCheckpoint; do \
	  $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) ./internal/targets || exit 1; done

clean:
	rm -rf $(BIN)
