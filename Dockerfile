# syntax=docker/dockerfile:1
#
# Corral worker/coordinator image.
#
#   docker build -t corral .
#   docker build -t corral-worker \
#     --build-arg PRELOAD_MODELS="sd15=https://models.example.com/sd15 dreamshaper=s3://bkt/ds8" .
#
# PRELOAD_MODELS: space-separated "id=source" pairs fetched at build time into
# /models/preloaded, the worker's read-only preloaded directory (never evicted, not counted
# against the 50 GB cache budget). Sources are what a manifest's `source` accepts: a
# directory published with `corral-manifest.json` over http(s)://, or s3://, gs://, az:// URLs
# mapped to their public HTTPS endpoints. See docs/cache.md for how to size the image
# (SaladCloud: 35 GB compressed at most).

ARG ORT_VERSION=1.30.0

# ---- build ---------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin corral \
 && install -D target/release/corral /out/corral

# ---- onnxruntime from the PyPI wheel (CUDA 12 build plus its CUDA/cuDNN wheels) ------------
FROM python:3.11-slim-bookworm AS ort
ARG ORT_VERSION
RUN pip install --no-cache-dir --target /pkgs "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}" \
 && mkdir -p /out/lib \
 && cp -a /pkgs/onnxruntime/capi/libonnxruntime*.so* /out/lib/ \
 && find /pkgs/nvidia -name 'lib*.so*' -exec cp -a {} /out/lib/ \; \
 && cd /out/lib && for f in libonnxruntime.so.*; do ln -sf "$f" libonnxruntime.so; break; done \
 && ls -la /out/lib

# ---- preloaded models ----------------------------------------------------------------------
FROM debian:bookworm-slim AS models
ARG PRELOAD_MODELS=""
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/corral /usr/local/bin/corral
# `corral models fetch --dir DIR ID=SOURCE...` runs `worker::cache::DiskCache::ensure` for each
# model: it writes verified bundles (files + .corral-bundle.json marker) into DIR, exactly the
# layout the worker reads from its preloaded directory.
RUN mkdir -p /models/preloaded \
 && if [ -n "${PRELOAD_MODELS}" ]; then \
      corral models fetch --dir /models/preloaded ${PRELOAD_MODELS}; \
    fi

# ---- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 tini \
 && rm -rf /var/lib/apt/lists/*
COPY --from=ort /out/lib /opt/onnxruntime/lib
COPY --from=build /out/corral /usr/local/bin/corral
COPY --from=models /models/preloaded /models/preloaded
ENV ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so \
    LD_LIBRARY_PATH=/opt/onnxruntime/lib \
    CORRAL_CACHE_DIR=/cache \
    CORRAL_PRELOADED_DIR=/models/preloaded \
    RUST_LOG=info
# The cache lives outside the image layers: SaladCloud's 50 GB of disk.
VOLUME /cache
ENTRYPOINT ["/usr/bin/tini", "--", "corral"]
CMD ["worker"]
