# builder/tensorflow:2.18.0-cuda12.5-cudnn9.3-py3.11-runtime-debian12
# Classic-builder syntax only: the Docker SDK cannot drive BuildKit.
# --- OS base: shared by the builder and final stages, so both reuse the same cached layers.
FROM debian:bookworm-slim AS os
LABEL org.builder.managed="true"
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# --- Python 3.11 (system), before any CUDA or framework layer. `apt-get clean`: a base
# without the official images' docker-clean hook would keep every downloaded .deb, and the image promises empty caches.
RUN touch /tmp/.builder-step \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && find /var/log /var/cache -xdev -type f -newer /tmp/.builder-step \( -path '/var/log/*' -o -name aux-cache \) \
      -exec truncate -s 0 {} + \
 && find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /etc/hosts -o -path /etc/hostname \
      -o -path /etc/resolv.conf \) -prune -o -newer /tmp/.builder-step -exec touch -h -d @0 {} + \
 && rm /tmp/.builder-step \
 && touch -h -d @0 /tmp

# --- Builder stage: the only stage that sees build-time package sources (CA bundle, indexes, wheelhouse).
FROM os AS builder
COPY sources/ /opt/builder-sources/
COPY requirements.txt /opt/builder-sources/requirements.txt
# uv installs the environment (it downloads in parallel and unpacks about twice as fast as pip: docs/bench-notes.md).
# uv itself stays in this stage. pip (the venv's) still checks the result and writes the lock.
COPY installer.txt /opt/builder-sources/installer.txt
RUN python3 -m venv /opt/venv \
 && PIP_CONFIG_FILE=/opt/builder-sources/pip.conf /opt/venv/bin/pip install --no-cache-dir --no-compile \
      --target /opt/builder-uv -r /opt/builder-sources/installer.txt \
 && if [ -f /opt/builder-sources/ca.pem ]; then export SSL_CERT_FILE=/opt/builder-sources/ca.pem; fi \
 && UV_CONFIG_FILE=/opt/builder-sources/uv.toml UV_HTTP_TIMEOUT=120 /opt/builder-uv/bin/uv pip install \
      --python /opt/venv/bin/python --no-cache -r /opt/builder-sources/requirements.txt \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip freeze --all > /opt/venv/requirements.lock \
 && mkdir -p /opt/builder-export/opt/cuda-libs \
 && if [ -d /opt/venv/lib/python3.11/site-packages/nvidia ]; then \
      mv /opt/venv/lib/python3.11/site-packages/nvidia /opt/builder-export/opt/cuda-libs/nvidia \
      && ln -s /opt/cuda-libs/nvidia /opt/venv/lib/python3.11/site-packages/nvidia; \
    fi \
 && find /opt/builder-export -exec touch -h -d @0 {} + \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} + \
 && mkdir -p /opt/builder-venv/opt \
 && cp -al /opt/venv /opt/builder-venv/opt/venv \
 && find /opt/builder-venv -exec touch -h -d @0 {} +

# --- Final stage: the shared OS and Python layers, then the installed environment and nothing else.
FROM os
# --- A non-root user with a numeric UID, so runtimes that refuse root (runAsNonRoot) accept the image.
# Its password-change day is the epoch's first (SOURCE_DATE_EPOCH; 0 would mean "change at next login"), not today.
RUN touch /tmp/.builder-step \
 && SOURCE_DATE_EPOCH=86400 useradd --uid 10001 --user-group --create-home --shell /bin/bash app \
 && find /var/log /var/cache -xdev -type f -newer /tmp/.builder-step \( -path '/var/log/*' -o -name aux-cache \) \
      -exec truncate -s 0 {} + \
 && find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /etc/hosts -o -path /etc/hostname \
      -o -path /etc/resolv.conf \) -prune -o -newer /tmp/.builder-step -exec touch -h -d @0 {} + \
 && rm /tmp/.builder-step \
 && touch -h -d @0 /tmp

# --- CUDA 12.5 from the framework's pip nvidia-* wheels.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=12.5 driver>=525"
# TensorFlow does not find its pip CUDA libraries by itself: put every nvidia/*/lib on the loader path.
ENV LD_LIBRARY_PATH=/opt/cuda-libs/nvidia/cublas/lib:/opt/cuda-libs/nvidia/cuda_cupti/lib:/opt/cuda-libs/nvidia/cuda_nvcc/lib:/opt/cuda-libs/nvidia/cuda_nvrtc/lib:/opt/cuda-libs/nvidia/cuda_runtime/lib:/opt/cuda-libs/nvidia/cudnn/lib:/opt/cuda-libs/nvidia/cufft/lib:/opt/cuda-libs/nvidia/curand/lib:/opt/cuda-libs/nvidia/cusolver/lib:/opt/cuda-libs/nvidia/cusparse/lib:/opt/cuda-libs/nvidia/nccl/lib:/opt/cuda-libs/nvidia/nvjitlink/lib \
    PATH=/opt/cuda-libs/nvidia/cuda_nvcc/bin:${PATH}

# The framework's pip CUDA libraries get a layer of their own, before the framework's. Copied into /
# with every path and timestamp fixed, its bytes depend only on the nvidia-* pins: cells that share
# the pins share the layer, whatever their base, Python or framework.
COPY --from=builder /opt/builder-export/ /
# The environment the same way (hard links to /opt/venv, rooted at / so that /opt comes with it; no .pyc, whose
# headers hold times): a cell's runtime and devel images share this layer even when pip ran twice.
COPY --from=builder /opt/builder-venv/ /
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# --- What the cell claims, for `builder certify` (which brings its current smoke payload at run time).
COPY cell.json /opt/builder/cell.json
LABEL org.opencontainers.image.title="tensorflow" \
      org.opencontainers.image.version="2.18.0" \
      org.opencontainers.image.base.name="debian:bookworm-slim" \
      org.opencontainers.image.description="tensorflow 2.18.0, cuda12.5, Python 3.11, runtime" \
      org.builder.tag="builder/tensorflow:2.18.0-cuda12.5-cudnn9.3-py3.11-runtime-debian12" \
      org.builder.framework="tensorflow" \
      org.builder.framework.version="2.18.0" \
      org.builder.cuda="12.5" \
      org.builder.cudnn="9.3.0.75" \
      org.builder.python="3.11" \
      org.builder.flavor="runtime" \
      org.builder.driver.min="525"
USER 10001:10001
WORKDIR /home/app
CMD ["python"]

