# The derta image: Ray (from the rayproject/ray base), CUDA torch and derta, for KubeRay pods and the Ray cluster
# launcher, so that no pod pip-installs anything at start (docs/cluster.md, "Build the image").
#
#   docker build -t derta:0.1.0-ray2.60.0 .                       # the tag `derta cluster render` defaults to
#   docker tag derta:0.1.0-ray2.60.0 REGISTRY/derta:0.1.0-ray2.60.0 && docker push REGISTRY/derta:0.1.0-ray2.60.0
#
# RAY_VERSION must equal the exact `ray[...]==X.Y.Z` pin in pyproject.toml and PYTHON_TAG the one in
# derta/cluster_render.py; tests/test_cluster_configs.py checks both.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu

ARG RAY_VERSION
# The PyPI Linux wheel of torch is the CUDA 12 build (it brings its own CUDA runtime; the node needs only the
# NVIDIA driver). Set TORCH_INDEX_URL to pick another build, e.g. https://download.pytorch.org/whl/cu126.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=

# Created as the image's user (ray), not by WORKDIR (root-owned), so the editable install can write its metadata.
RUN mkdir -p /home/ray/derta
WORKDIR /home/ray/derta
# Dependencies in their own layer: only a pyproject.toml change rebuilds it. Empty package dirs let the editable
# install resolve before the code is copied.
COPY --chown=ray:users pyproject.toml README.md ./
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
 && mkdir -p derta serve jobs && touch derta/__init__.py serve/__init__.py jobs/__init__.py \
 && pip install --no-cache-dir -e . \
 && python -c "import ray, sys; v = ray.__version__; sys.exit(0 if v == '${RAY_VERSION}' else f'image Ray {v} != pin ${RAY_VERSION}')"

# Editable install: configs/ (presets by name), jobs/ (`python -m jobs.train`) and serve/ (`serve.app:build_app`)
# resolve from here whatever the working directory of the Ray driver or replica.
COPY --chown=ray:users . .
RUN python -c "import derta.cli, jobs.train, serve.app; from derta.config import load_config; load_config('llama3-8b-full-derta')"
