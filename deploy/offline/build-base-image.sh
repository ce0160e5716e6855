#!/usr/bin/env bash
# Make the base image the Dockerfiles name (python:3.11-slim) available without a registry.
#
# Online hosts never need this: `docker build` pulls python:3.11-slim as usual.
# On an air-gapped host (or CI here, where only the Debian mirror and PyPI are reachable)
# it builds an equivalent image from a Debian bookworm rootfs made with debootstrap
# (Python 3.11, venv, CA certificates) and tags it python:3.11-slim, so the unchanged
# Dockerfiles build offline. The Debian mirror is read from this host's apt sources.
#
# Usage: deploy/offline/build-base-image.sh [IMAGE_TAG]   (needs root, docker, debootstrap)
set -euo pipefail

tag=${1:-python:3.11-slim}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag already present"
  exit 0
fi
if timeout 60 docker pull "$tag" >/dev/null 2>&1; then
  echo "pulled $tag from a registry"
  exit 0
fi

mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1)
if [ -z "$mirror" ]; then
  mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -n1)
fi
[ -n "$mirror" ] || { echo "no Debian mirror found in this host's apt sources" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debootstrap is not installed" >&2; exit 1; }

rootfs=$(mktemp -d /tmp/dmoe-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm from $mirror into $rootfs"
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
chroot "$rootfs" apt-get install -y --no-install-recommends \
  python3 python3-venv ca-certificates >/dev/null
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/*
# pip inside the image reaches PyPI only with the host's CA bundle
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
ln -sf python3 "$rootfs/usr/bin/python"

tar -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$tag" >/dev/null
echo "built $tag from Debian bookworm ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"
