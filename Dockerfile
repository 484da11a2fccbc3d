# syntax=docker/dockerfile:1
#
# One image for every binary: refund-worker (default command), refundctl, refund-reconciler and
# refund-sim. Build from the workspace root:
#
#   docker build -t refunds:dev .
#   docker run --rm refunds:dev refundctl --help
#
# The build stage compiles with the toolchain the workspace is tested with (rust-version in
# Cargo.toml is the minimum) against libssl-dev; the runtime stage is Debian slim with only
# libssl3 (lapin's TLS), CA certificates (https providers, amqps), tzdata (the reconciler
# CronJob computes "yesterday" in the business time zone) and tini (PID 1: forwards SIGTERM,
# reaps children). It runs as an unprivileged user and holds no configuration and no secrets:
# refunds.toml, keys and URLs are mounted or set at run time (docs/operations.md).

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
        --bin refund-worker --bin refundctl --bin refund-reconciler --bin refund-sim \
 && mkdir -p /out \
 && cp target/release/refund-worker target/release/refundctl \
       target/release/refund-reconciler target/release/refund-sim /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 tzdata tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 refunds \
 && useradd --system --uid 10001 --gid refunds --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin refunds \
 && mkdir -p /etc/refunds
COPY --from=build /out/ /usr/local/bin/
LABEL org.opencontainers.image.title="refunds" \
      org.opencontainers.image.description="Refund processor: refund-worker, refundctl, refund-reconciler, refund-sim" \
      org.opencontainers.image.licenses="Apache-2.0"
# Config files are looked up here: --config / REFUNDS_CONFIG, or ./refunds.toml.
WORKDIR /etc/refunds
ENV RUST_LOG=info
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# /metrics, /healthz, /readyz (set REFUNDS__WORKER__METRICS_ADDR=0.0.0.0:9464 in a container).
EXPOSE 9464 9465
# In Kubernetes, set `args` (not `command`) so that tini stays PID 1.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["refund-worker"]
