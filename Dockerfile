# tenantd: build with the Rust toolchain, run on a slim Debian with CA
# certificates (Tigris is reached over TLS) as a non-root user.

FROM rust:1-bookworm AS builder
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them: the
# real manifests of the workspace with dummy sources compile every
# dependency once.
COPY Cargo.toml Cargo.lock ./
COPY crates/tenantd-core/Cargo.toml crates/tenantd-core/
COPY crates/tenantd-dev/Cargo.toml crates/tenantd-dev/
COPY crates/tenantd-chaos/Cargo.toml crates/tenantd-chaos/
COPY crates/tenantd-bench/Cargo.toml crates/tenantd-bench/
COPY crates/tenantd-sim/Cargo.toml crates/tenantd-sim/
RUN mkdir -p src && echo 'fn main() {}' > src/main.rs \
    && for c in crates/*/; do mkdir -p "$c/src" && touch "$c/src/lib.rs"; done \
    && cargo build --release --locked \
    && rm -rf src crates/*/src
COPY src ./src
COPY crates ./crates
# Make sure cargo sees the real sources as newer than the dummy build.
RUN find src crates -name '*.rs' -exec touch {} + && cargo build --release --locked

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /data tenantd
COPY --from=builder /src/target/release/tenantd /usr/local/bin/tenantd
USER tenantd
WORKDIR /data
ENV TENANTD_LISTEN=0.0.0.0:3000 DATABASE_PATH=/data/local
EXPOSE 3000
ENTRYPOINT ["/usr/local/bin/tenantd"]
CMD ["serve"]
