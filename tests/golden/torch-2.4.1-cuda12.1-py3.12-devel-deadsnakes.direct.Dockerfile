# builder/torch:2.4.1-cuda12.1-cudnn9.1-py3.12-devel-cuda-devel-ubuntu22.04
# Classic-builder syntax only: the Docker SDK cannot drive BuildKit.
# --- OS base: shared by the builder and final stages, so both reuse the same cached layers.
FROM nvidia/cuda:12.1.1-devel-ubuntu22.04 AS os
LABEL org.builder.managed="true"
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# --- Python 3.12 (deadsnakes), before any CUDA or framework layer. `apt-get clean`: a base
# without the official images' docker-clean hook would keep every downloaded .deb, and the image promises empty caches.
RUN touch /tmp/.builder-step \
 && apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && find /var/log /var/cache -xdev -type f -newer /tmp/.builder-step \( -path '/var/log/*' -o -name aux-cache \) \
      -exec truncate -s 0 {} + \
 && find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /etc/hosts -o -path /etc/hostname \
      -o -path /etc/resolv.conf \) -prune -o -newer /tmp/.builder-step -exec touch -h -d @0 {} + \
 && rm /tmp/.builder-step \
 && touch -h -d @0 /tmp

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

# --- CUDA 12.1 from the framework's pip nvidia-* wheels.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=12.1 driver>=525"

# The package proxy is reached through Docker's predefined http_proxy argument (kept out of the image, its
# history and the cache key) under a name that is the same on every host: the sources stay on the host. uv
# comes from the proxy too and leaves with /tmp/builder-tools; times are pinned so that a layer's bytes depend on
# its packages alone (/opt and /tmp change as the files are written).
# The CUDA libraries from the framework's nvidia-* wheels, resolved here as below, in a layer of their own:
# cells that resolve the same nvidia-* pins share it, whatever their base, Python or framework.
RUN export UV_INDEX_URL=http://packages.builder.invalid/simple UV_INDEX_STRATEGY=unsafe-best-match UV_NO_CACHE=1 UV_HTTP_TIMEOUT=300 \
 && python3.12 -c 'import hashlib, io, os, platform, re, sys, urllib.parse, urllib.request as r, zipfile; \
      index, version, machine = "http://packages.builder.invalid/simple/uv/", "0.13.8", platform.machine(); \
      page = r.urlopen(index, timeout=300).read().decode(); \
      found = re.findall("href=.([^#<>\\s]*?/uv-" + re.escape(version) + "-py3-none-manylinux[^#<>\\s/]*_" \
        + machine + "\\.whl)(?:#sha256=([0-9a-fA-F]{64}))?", page); \
      found or sys.exit(f"no uv {version} wheel for {machine} at {index}"); \
      found.sort(key=lambda link: not link[1]); \
      data = r.urlopen(urllib.parse.urljoin(index, found[0][0]), timeout=300).read(); \
      found[0][1] or print("warning: the uv wheel from a page without hashes is not checked", file=sys.stderr); \
      not found[0][1] or hashlib.sha256(data).hexdigest() == found[0][1].lower() \
        or sys.exit("the uv wheel fails its sha256"); \
      os.makedirs("/tmp/builder-tools/uv/bin"); \
      open("/tmp/builder-tools/uv/bin/uv", "wb").write(zipfile.ZipFile(io.BytesIO(data)).read(f"uv-{version}.data/scripts/uv")); \
      os.chmod("/tmp/builder-tools/uv/bin/uv", 0o755)' \
 && printf '%s\n' 'torch==2.4.1' 'torchvision==0.19.1' > /tmp/builder-tools/requirements.txt \
 && /tmp/builder-tools/uv/bin/uv pip compile --python python3.12 --no-header --no-annotate \
      -o /tmp/builder-tools/lock.txt /tmp/builder-tools/requirements.txt \
 && if grep -i '^nvidia-' /tmp/builder-tools/lock.txt > /tmp/builder-tools/cuda.txt; then \
      /tmp/builder-tools/uv/bin/uv pip install --python python3.12 --target /opt/cuda-libs --no-deps -r /tmp/builder-tools/cuda.txt \
      && rm -f /opt/cuda-libs/.lock \
      && find /opt/cuda-libs -exec touch -h -d @0 {} +; \
    fi \
 && rm -rf /tmp/builder-tools \
 && touch -h -d @0 /opt /tmp
# The environment, the same resolution without the nvidia-* pins: the venv finds their modules through a symlink,
# as before, and their dist-info through a .pth file. The build fails if the two resolutions ever disagree on
# those pins (compared here: pip check does not look at extras such as TensorFlow's and-cuda); pip freeze writes
# the lock while pip check runs beside it (each is mostly pip's import: 0.86 s together, 1.55 s in turn). uv's
# own listing and check cannot stand in: they do not follow the .pth file to the CUDA layer's dist-info. (uv's
# .lock files are its own, and world-writable: not kept.)
RUN export UV_INDEX_URL=http://packages.builder.invalid/simple UV_INDEX_STRATEGY=unsafe-best-match UV_NO_CACHE=1 UV_HTTP_TIMEOUT=300 \
 && python3.12 -c 'import hashlib, io, os, platform, re, sys, urllib.parse, urllib.request as r, zipfile; \
      index, version, machine = "http://packages.builder.invalid/simple/uv/", "0.13.8", platform.machine(); \
      page = r.urlopen(index, timeout=300).read().decode(); \
      found = re.findall("href=.([^#<>\\s]*?/uv-" + re.escape(version) + "-py3-none-manylinux[^#<>\\s/]*_" \
        + machine + "\\.whl)(?:#sha256=([0-9a-fA-F]{64}))?", page); \
      found or sys.exit(f"no uv {version} wheel for {machine} at {index}"); \
      found.sort(key=lambda link: not link[1]); \
      data = r.urlopen(urllib.parse.urljoin(index, found[0][0]), timeout=300).read(); \
      found[0][1] or print("warning: the uv wheel from a page without hashes is not checked", file=sys.stderr); \
      not found[0][1] or hashlib.sha256(data).hexdigest() == found[0][1].lower() \
        or sys.exit("the uv wheel fails its sha256"); \
      os.makedirs("/tmp/builder-tools/uv/bin"); \
      open("/tmp/builder-tools/uv/bin/uv", "wb").write(zipfile.ZipFile(io.BytesIO(data)).read(f"uv-{version}.data/scripts/uv")); \
      os.chmod("/tmp/builder-tools/uv/bin/uv", 0o755)' \
 && printf '%s\n' 'torch==2.4.1' 'torchvision==0.19.1' > /tmp/builder-tools/requirements.txt \
 && python3.12 -m venv --without-pip /opt/venv \
 && /opt/venv/bin/python -I -c 'import ensurepip, subprocess, sys; run_pip = ensurepip._run_pip; \
      by_uv = lambda args, links: subprocess.run(["/tmp/builder-tools/uv/bin/uv", "pip", "install", "--quiet", "--python", sys.executable, \
        "--no-index", "--find-links", links, *[a for a in args[1:] if a[0] != "-" and a != links]], check=True).returncode; \
      ensurepip._run_pip = lambda args, paths=None: \
        by_uv(args, args[args.index("--find-links") + 1]) if "--find-links" in args else run_pip(args, paths); \
      ensurepip.bootstrap(upgrade=True, default_pip=True)' \
 && rm -f /opt/venv/.lock /opt/venv/lib/python*/site-packages/*.dist-info/uv_cache.json \
 && sed -i '/^[^,]*[.]dist-info\/uv_cache[.]json,/d' /opt/venv/lib/python*/site-packages/*.dist-info/RECORD \
 && /tmp/builder-tools/uv/bin/uv pip freeze --python /opt/venv/bin/python > /tmp/builder-tools/lock.txt \
 && /tmp/builder-tools/uv/bin/uv pip compile --python python3.12 --no-header --no-annotate \
      -o /tmp/builder-tools/lock.txt /tmp/builder-tools/requirements.txt \
 && if [ -d /opt/cuda-libs/nvidia ]; then \
      echo /opt/cuda-libs > /opt/venv/lib/python3.12/site-packages/builder-cuda-libs.pth \
      && ln -s /opt/cuda-libs/nvidia /opt/venv/lib/python3.12/site-packages/nvidia; \
    fi \
 && { grep -iv '^nvidia-' /tmp/builder-tools/lock.txt || true; } > /tmp/builder-tools/env.txt \
 && /tmp/builder-tools/uv/bin/uv pip install --python /opt/venv/bin/python --no-deps -r /tmp/builder-tools/env.txt \
 && rm -f /opt/venv/.lock \
 && { /opt/venv/bin/pip check > /tmp/builder-tools/check.txt 2>&1 & check=$!; } \
 && /opt/venv/bin/pip freeze --all > /opt/venv/requirements.lock \
 && for f in /tmp/builder-tools/lock.txt /opt/venv/requirements.lock; do \
      sed -n 's/[ ;].*//; y/ABCDEFGHIJKLMNOPQRSTUVWXYZ_/abcdefghijklmnopqrstuvwxyz-/; /^nvidia[-.]/p' "$f" \
        > "$f.cuda" && sort -o "$f.cuda" "$f.cuda" || exit 1; \
    done \
 && if ! cmp -s /tmp/builder-tools/lock.txt.cuda /opt/venv/requirements.lock.cuda; then \
      echo "the CUDA layer's nvidia-* pins differ from this resolution's:" >&2; \
      diff /opt/venv/requirements.lock.cuda /tmp/builder-tools/lock.txt.cuda >&2; exit 1; \
    fi \
 && rm /opt/venv/requirements.lock.cuda \
 && if ! wait "$check"; then cat /tmp/builder-tools/check.txt >&2; exit 1; fi \
 && cat /tmp/builder-tools/check.txt \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} + \
 && rm -rf /tmp/builder-tools \
 && find /opt/venv -exec touch -h -d @0 {} + \
 && touch -h -d @0 /opt /tmp

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# --- What the cell claims, for `builder certify` (which brings its current smoke payload at run time).
COPY cell.json /opt/builder/cell.json
LABEL org.opencontainers.image.title="torch" \
      org.opencontainers.image.version="2.4.1" \
      org.opencontainers.image.base.name="nvidia/cuda:12.1.1-devel-ubuntu22.04" \
      org.opencontainers.image.description="torch 2.4.1, cuda12.1, Python 3.12, devel" \
      org.builder.tag="builder/torch:2.4.1-cuda12.1-cudnn9.1-py3.12-devel-cuda-devel-ubuntu22.04" \
      org.builder.framework="torch" \
      org.builder.framework.version="2.4.1" \
      org.builder.cuda="12.1" \
      org.builder.cudnn="9.1.0.70" \
      org.builder.python="3.12" \
      org.builder.flavor="devel" \
      org.builder.driver.min="525"
USER 10001:10001
WORKDIR /home/app
CMD ["python"]

