# syntax=docker/dockerfile:1
#
# Two images from one file. The default (last) stage, `runtime`, is the production image: the
# production binaries only, refund-worker (default command), refundctl and refund-reconciler
# (DESIGN §2: worker/ and reconciler/). The development tools (the provider simulator
# refund-sim, the fault proxy, the benchmarks, the demo) are built in a stage of their own and
# shipped only in the `dev` image, so production never holds a fake provider that answers
# "paid" to anything. Build from the workspace root:
#
#   docker build -t refunds:0.1.0 .                    # production
#   docker build --target dev -t refunds-dev:0.1.0 .   # production + development tools
#   docker run --rm refunds:0.1.0 refundctl --help
#
# `scripts/check-image.py` (run by `just lint`) checks that the production stage copies exactly
# the workspace's production binaries and nothing else.
#
# The build stage compiles with the toolchain the workspace is tested with (rust-version in
# Cargo.toml is the minimum) against libssl-dev; the runtime stage is Debian slim with only
# libssl3 (the one TLS stack: PostgreSQL, AMQP and https providers), CA certificates (https
# providers, amqps, the database's CA when public), tzdata (the reconciler CronJob computes
# "yesterday" in the business time zone) and tini (PID 1: forwards SIGTERM, reaps children). It
# runs as an unprivileged user and holds no configuration and no secrets: refunds.toml, keys and
# URLs are mounted or set at run time (docs/operations.md). The dev image holds no keys or
# config either (.dockerignore keeps keys/ and config/ out of the build context): mount them.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit); the binaries are copied out
# of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        --bin refund-worker --bin refundctl --bin refund-console --bin refund-reconciler \
 && mkdir -p /out \
 && cp target/release/refund-worker target/release/refundctl target/release/refund-console \
       target/release/refund-reconciler /out/

# The development tools, on top of the production build (same cache, so shared crates are
# compiled once).
FROM build AS build-dev
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        --bin refund-sim --bin fault-proxy --bin refund-demo \
        --bin refund-bench --bin reconcile-bench --bin dlq-bench \
 && mkdir -p /out-dev \
 && cp target/release/refund-sim target/release/fault-proxy target/release/refund-demo \
       target/release/refund-bench target/release/reconcile-bench target/release/dlq-bench \
       /out-dev/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime-base
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 tzdata tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 refunds \
 && useradd --system --uid 10001 --gid refunds --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin refunds \
 && mkdir -p /etc/refunds
# Config files are looked up here: --config / REFUNDS_CONFIG, or ./refunds.toml.
WORKDIR /etc/refunds
ENV RUST_LOG=info
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# /metrics, /healthz, /readyz (set REFUNDS__WORKER__METRICS_ADDR=0.0.0.0:9464 in a container)
# and the notify listener. refund-console listens on 9470 (REFUNDS__CONSOLE__ADDR=0.0.0.0:9470),
# its own Deployment's port; k8s/validate.py checks this line against the worker's manifests.
EXPOSE 9464 9465
# In Kubernetes, set `args` (not `command`) so that tini stays PID 1.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["refund-worker"]

# The development image: the production binaries and the development tools.
FROM runtime-base AS dev
COPY --from=build /out/refund-worker /out/refundctl /out/refund-console /out/refund-reconciler /usr/local/bin/
COPY --from=build-dev /out-dev/ /usr/local/bin/
LABEL org.opencontainers.image.title="refunds-dev" \
      org.opencontainers.image.description="Refund processor with development tools: refund-sim, fault-proxy, refund-demo, benches; never for production" \
      org.opencontainers.image.licenses="Apache-2.0"

# The production image (the default target): production binaries only.
FROM runtime-base AS runtime
COPY --from=build /out/refund-worker /out/refundctl /out/refund-console /out/refund-reconciler /usr/local/bin/
LABEL org.opencontainers.image.title="refunds" \
      org.opencontainers.image.description="Refund processor: refund-worker, refundctl, refund-console, refund-reconciler" \
      org.opencontainers.image.licenses="Apache-2.0"
