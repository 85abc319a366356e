# fanout: `make demo` runs the main job locally, `make test` runs every test.
SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: all build test test-bins chart-test python-deps lint images kind-up deploy undeploy e2e-cluster e2e-kind fmt demo bench certs golden clean

all: build

build:
	$(CARGO) build --workspace --bins

## Every test: unit, golden, property, and the end-to-end suites on loopback.
test: test-bins chart-test python-deps
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --workspace --no-fail-fast
else
	$(CARGO) test --workspace --no-fail-fast
endif

## The Helm chart, with the real Helm engine: lint for every cert mode, and what an install creates.
chart-test: python-deps test-bins
	$(PYTHON) charts/lint.py
	$(PYTHON) -m unittest discover -s charts -p 'test_*.py'

## The Helm engine (PyPI helm-sdkpy, which declares a newer Python than it needs), PyYAML, and
## grpcio (gRPC C-core, a peer server for the proxy's end-to-end tests).
python-deps:
	@$(PYTHON) -c 'import helm_sdkpy, yaml, grpc' 2>/dev/null || \
		$(PYTHON) -m pip install --quiet --ignore-requires-python helm-sdkpy pyyaml grpcio

## The binaries the end-to-end tests start, with the tests, built as `e2e/src/bins.rs` builds
## them: one build with one feature set, so that no test compiles (and starves the tests running
## beside it) on a fresh clone, and the test run's own build finds everything done.
test-bins:
	$(CARGO) build --workspace --bins --tests

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Rewrite the webhook's golden patches after an intended change; review the diff.
golden:
	UPDATE_GOLDEN=1 $(CARGO) test -p fanout-webhook --test golden

## Backends, DNS and the proxy with a config the webhook rendered; prints the balance table.
demo:
	$(CARGO) build --release --workspace --bins
	./target/release/fanout-demo

## Tables and a chart under target/bench/, about 25 minutes: the webhook; the proxy next to a
## direct connection, HAProxy and nginx (3 rounds, medians); and the proxy's cost curve (10 to
## 1,000 endpoints, 4 and 256 connections, 10,000 open streams). HAProxy, nginx and h2load join
## when installed (Debian: apt-get install haproxy nginx-light nghttp2-client). Both run the
## proxy on each data path (`fanout`, its default wire path, and `fanout h2`); `--peers` chooses.
bench:
	$(CARGO) build --release --workspace --bins
	./target/release/fanout-bench webhook
	./target/release/fanout-bench proxy
	./target/release/fanout-bench curve

## Container images (docker): the webhook, the proxy, and the test backend/client of the cluster suite.
IMAGE_REPO ?= ghcr.io/fanout-dev
IMAGE_TAG ?= dev
KIND_CLUSTER ?= fanout
IMAGES := fanout-webhook fanout-proxy fanout-test

images:
	docker build -f webhook/Dockerfile -t $(IMAGE_REPO)/fanout-webhook:$(IMAGE_TAG) .
	docker build -f proxy/Dockerfile -t $(IMAGE_REPO)/fanout-proxy:$(IMAGE_TAG) .
	docker build -f e2e/Dockerfile.test -t $(IMAGE_REPO)/fanout-test:$(IMAGE_TAG) .

## A local kind cluster named $(KIND_CLUSTER) (kubectl context kind-$(KIND_CLUSTER)).
kind-up:
	kind get clusters | grep -qx '$(KIND_CLUSTER)' || kind create cluster --name $(KIND_CLUSTER) --wait 120s

## The images into kind, and the chart installed with them.
deploy: images
	kind load docker-image --name $(KIND_CLUSTER) $(foreach i,$(IMAGES),$(IMAGE_REPO)/$(i):$(IMAGE_TAG))
	helm upgrade --install fanout charts/fanout --namespace fanout-system --create-namespace --wait \
		--set image.repository=$(IMAGE_REPO)/fanout-webhook --set image.tag=$(IMAGE_TAG) \
		--set proxy.image.repository=$(IMAGE_REPO)/fanout-proxy --set proxy.image.tag=$(IMAGE_TAG)

undeploy:
	helm uninstall fanout --namespace fanout-system

## The cluster suite against the cluster in $$KUBECONFIG (it installs the chart there, with the
## images $(IMAGE_REPO)/*:$(IMAGE_TAG) the cluster must be able to pull).
e2e-cluster:
	@test -n "$$KUBECONFIG" || { echo "e2e-cluster: set KUBECONFIG to the cluster to test"; exit 1; }
	FANOUT_IMAGE_REPO=$(IMAGE_REPO) FANOUT_IMAGE_TAG=$(IMAGE_TAG) \
		$(CARGO) test -p fanout-e2e --test cluster -- --ignored --nocapture

## The cluster suite on kind: chart, opted-in namespace, backends, gateway, spread.
e2e-kind: kind-up deploy
	KUBECONFIG=$${KUBECONFIG:-$$HOME/.kube/config} $(MAKE) e2e-cluster

## A CA and serving certificate for running the webhook by hand.
certs:
	$(CARGO) run --quiet -p fanout-certs -- --out certs-out \
		--dns localhost fanout-webhook.fanout-system.svc --ip 127.0.0.1

clean:
	$(CARGO) clean
