# grazbids BIDS App image.
#
#   docker build -t grazbids:0.1.0 -t grazbids:latest \
#       --build-arg CONSTRAINTS_SHA256=$(sha256sum constraints.txt | cut -c1-64) .   # CPU build (default)
#   docker build -t grazbids:0.1.0-cu128 --build-arg IMAGE_TAG=grazbids:0.1.0-cu128 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .        # CUDA build
#   docker run --rm -v /data/ds:/bids:ro -v /data/out:/out grazbids /bids /out participant
#
# Build arguments:
#   BASE_IMAGE       a Python 3.11 image (python:3.11-slim) or plain Debian bookworm (Debian's
#                    python3 and python3-venv are installed when the base has no venv module)
#   TORCH_SPEC       pip requirement for PyTorch (default torch==2.13.0)
#   TORCH_INDEX_URL  index PyTorch is installed from: .../whl/cpu (default, CPU-only build, no
#                    CUDA libraries), .../whl/cu128 etc. for a CUDA build; empty = PyPI plus the
#                    wheels/ folder of the build context (offline builds with a local wheel)
#   TEMPLATEFLOW_TEMPLATES  extra TemplateFlow templates to embed, fetched at build time (needs
#                    network), e.g. "MNI152NLin2009cAsym:1,2 MNI152NLin6Asym:2"
#   BUILD_CA_BUNDLE  CA bundle path for pip/TemplateFlow downloads (TLS-inspecting proxies)
#   PIP_INDEX_URL    a PyPI mirror, used for every pip step (with TORCH_INDEX_URL set, it
#                    replaces pypi.org as the extra index of the PyTorch step)
#   CONSTRAINTS_SHA256  sha256 of constraints.txt, checked and recorded in a label (optional)
#   GRAZBIDS_VERSION must equal grazbids.__version__ (checked); VCS_REF, BUILD_DATE, SOURCE_URL
#                    fill the OCI labels; IMAGE_TAG (default grazbids:<version>) is recorded as
#                    GeneratedBy.Container.Tag in the derivatives' dataset_description.json
# See docs/containers.md.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- builder: venv + templates
FROM ${BASE_IMAGE} AS builder

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ARG TEMPLATEFLOW_TEMPLATES=""
ARG GRAZBIDS_VERSION=0.1.0
# CA bundle (a path inside the build, e.g. bind-mounted with `buildah bud -v`) for pip and
# TemplateFlow downloads behind a TLS-inspecting proxy; PIP_INDEX_URL works for mirrors
ARG BUILD_CA_BUNDLE=""
ARG PIP_INDEX_URL=""
ARG CONSTRAINTS_SHA256=""

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Debian's python3 ships venv/ensurepip separately (python3-venv); python:3.11-slim has both.
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c "import sys; assert sys.version_info[:2] == (3, 11), 'grazbids images need Python 3.11, base has ' + sys.version" \
    && python3 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH

COPY . /src

# PyTorch first, from the chosen index (CPU or CUDA); wheels/ in the build context, if any,
# is searched too. Then grazbids itself and the offline BIDS validator. Headers and the
# packages' own test suites (about 300 MB) are dropped; the checks below import what runs.
RUN set -eu; \
    if [ -n "${BUILD_CA_BUNDLE}" ]; then export PIP_CERT="${BUILD_CA_BUNDLE}"; fi; \
    if [ -n "${CONSTRAINTS_SHA256}" ]; then echo "${CONSTRAINTS_SHA256}  /src/constraints.txt" | sha256sum -c -; fi; \
    if [ -z "${PIP_INDEX_URL}" ]; then unset PIP_INDEX_URL; fi; \
    pins="-c /src/constraints.txt"; \
    find_links=""; \
    if [ -d /src/wheels ]; then find_links="--find-links /src/wheels"; fi; \
    if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install $pins $find_links --index-url "${TORCH_INDEX_URL}" \
            --extra-index-url "${PIP_INDEX_URL:-https://pypi.org/simple}" "${TORCH_SPEC}"; \
    else \
        pip install $pins $find_links ${PIP_INDEX_URL:+--index-url "$PIP_INDEX_URL"} "${TORCH_SPEC}"; \
    fi; \
    pip install $pins $find_links ${PIP_INDEX_URL:+--index-url "$PIP_INDEX_URL"} /src bids-validator-deno; \
    pip check; \
    pip freeze --exclude-editable > /opt/venv/grazbids-pip-freeze.txt; \
    cp /src/constraints.txt /opt/venv/grazbids-constraints.txt; \
    site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
    rm -rf "$site/torch/include" "$site/torch/test" "$site/torch/share/cmake"; \
    find "$site" -type d -name tests -prune -exec rm -rf {} +; \
    python -c "import grazbids, sys; v = grazbids.__version__; sys.exit(0 if v == '${GRAZBIDS_VERSION}' else 'GRAZBIDS_VERSION=${GRAZBIDS_VERSION} but the package is ' + v)"; \
    python -c "import torch, ants, nipype, bids, nilearn; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; \
    grazbids --version; \
    bids-validator-deno --version

# Templates: the embedded MNI152NLin2009aSym (built from nilearn data, no network), plus any
# TemplateFlow templates requested at build time; only non-empty files are kept (TemplateFlow's
# skeleton is zero-byte placeholders). World-readable, so any user id can run the image.
RUN set -eu; \
    GRAZBIDS_TEMPLATE_DIR=/opt/templateflow python -c "from grazbids.templates import ensure_embedded_template as e; print(e())"; \
    if [ -n "${TEMPLATEFLOW_TEMPLATES}" ]; then \
        export TEMPLATEFLOW_HOME=/tmp/templateflow-download TEMPLATEFLOW_AUTOUPDATE=1; \
        if [ -n "${BUILD_CA_BUNDLE}" ]; then export REQUESTS_CA_BUNDLE="${BUILD_CA_BUNDLE}"; fi; \
        for spec in ${TEMPLATEFLOW_TEMPLATES}; do \
            python -c "import sys; from templateflow import api; name, _, res = sys.argv[1].partition(':'); res = [int(r) for r in res.split(',')] if res else None; got = api.get(name, resolution=res, extension='.nii.gz', atlas=None, hemi=None, cohort=None); got = got if isinstance(got, list) else [got]; print(name, len(got), 'files'); api.get(name, extension='.json', atlas=None, hemi=None)" "$spec"; \
        done; \
        cd "$TEMPLATEFLOW_HOME" && find . -path './tpl-*' -type f -size +0 -exec cp --parents {} /opt/templateflow/ \; ; \
        rm -rf "$TEMPLATEFLOW_HOME"; \
    fi; \
    chmod -R a+rX,go-w /opt/templateflow

# ---------------------------------------------------------------- runtime image
FROM ${BASE_IMAGE}

ARG GRAZBIDS_VERSION=0.1.0
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ARG VCS_REF=""
ARG BUILD_DATE=""
ARG SOURCE_URL=""
# recorded in dataset_description.json (GeneratedBy.Container.Tag) of every run
ARG IMAGE_TAG=grazbids:${GRAZBIDS_VERSION}
ARG CONSTRAINTS_SHA256=""

# A Debian base has no python3 yet; the venv below links to the base's interpreter.
# g++ (and Python's headers, which python:3.11-slim has): torch.compile builds the engine's
# fused CPU kernels with them (grazbids/engine/pointwise.py); without them the eager
# kernels run, with the same results, more slowly.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
    && if ! command -v python3 >/dev/null; then \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-dev; \
    fi \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash grazbids

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/templateflow /opt/templateflow

LABEL org.opencontainers.image.title="grazbids" \
      org.opencontainers.image.description="BIDS App: relevance-guided (Graz+) 3D CNN training and explanation of brain T1w MRI" \
      org.opencontainers.image.version="${GRAZBIDS_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.grazbids.torch.spec="${TORCH_SPEC}" \
      org.grazbids.torch.index="${TORCH_INDEX_URL}" \
      org.grazbids.python.constraints="constraints.txt sha256:${CONSTRAINTS_SHA256}" \
      org.grazbids.python.versions="/opt/venv/grazbids-pip-freeze.txt (pip freeze of the image)"

# Thread variables default to 1 for anything run in the image; grazbids itself sets them from
# --omp-nthreads (default min(8, --nprocs)). Nothing is fetched at run time: TemplateFlow
# auto-update and Nipype's version check (etelemetry) are off.
ENV PATH=/opt/venv/bin:$PATH \
    GRAZBIDS_TEMPLATE_DIR=/opt/templateflow \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    NIPYPE_NO_ET=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    GRAZBIDS_CONTAINER_TYPE=docker \
    GRAZBIDS_CONTAINER_TAG=${IMAGE_TAG}

USER grazbids
WORKDIR /tmp
ENTRYPOINT ["grazbids"]
CMD ["--help"]
