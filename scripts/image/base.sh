#!/usr/bin/env bash
# Build the local Debian base image the pmlb image can start from where no image
# registry is reachable: debootstrap (minbase) Debian bookworm with Python 3.11,
# imported into the container engine as pmlb-base:bookworm (~ a couple of minutes).
#   scripts/image/base.sh [TAG]
set -euo pipefail
tag="${1:-pmlb-base:bookworm}"
if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag already built"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }
root="$(mktemp -d /tmp/pmlb-rootfs-XXXXXX)"
trap 'rm -rf "$root"' EXIT
# libnghttp2-14: the library the wheel's native link transport is linked with.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libnghttp2-14 \
    bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
echo "built base image $tag"
