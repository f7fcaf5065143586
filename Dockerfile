# Multi-stage build: compile in the Rust image, run in a slim Debian as an
# unprivileged user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --profile dist --locked --bin tollgate

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --create-home tollgate
WORKDIR /app
COPY --from=build /src/target/dist/tollgate /usr/local/bin/tollgate
COPY config ./config
# The example config listens on loopback; in a container both listeners
# must be reachable from outside it. Mount your own file over this one.
RUN sed 's/127\.0\.0\.1:/0.0.0.0:/' config/tollgate.toml > config/container.toml \
    && mkdir -p data && chown tollgate data
USER tollgate
EXPOSE 8787 9787
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["--config", "config/container.toml"]
