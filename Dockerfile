# tenantd: build with the Rust toolchain, run on a slim Debian with CA
# certificates (Tigris is reached over TLS) as a non-root user.

FROM rust:1-bookworm AS builder
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them: a
# dummy crate with the real manifest compiles every dependency once.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
# Make sure cargo sees the real sources as newer than the dummy build.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

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
