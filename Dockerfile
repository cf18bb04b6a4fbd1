# The `tandem` binary in a small runtime image, for the manifests of `tandem k8s`
# (docs/kubernetes.md). Build from the repository root:
#
#   docker build -t registry.example.com/tandem:0.1.0 .
#
# The kernels pick AVX-512, AVX2 or scalar code at run time, so one image serves every
# x86-64 node. Models are not baked in: mount them (--model-pvc) or build FROM this image
# and COPY a checkpoint to the --model-path you give `tandem k8s`.

# ---- build ----
# The toolchain CI tests with (Cargo.lock needs 1.89 or newer).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN cargo build --release --locked -p tandem-cli \
    && strip target/release/tandem \
    && cp target/release/tandem /usr/local/bin/tandem

# ---- runtime ----
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 tandem \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin tandem
COPY --from=build /usr/local/bin/tandem /usr/local/bin/tandem
# The pod specs run as this user (runAsUser 10001) with a read-only root filesystem;
# /tmp is an emptyDir there.
USER 10001:10001
ENV HOME=/tmp
EXPOSE 8000 9000
ENTRYPOINT ["tandem"]
CMD ["--help"]
