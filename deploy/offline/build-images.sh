#!/usr/bin/env bash
# Build the dmoe images with no container registry (air-gapped hosts, CI here).
#
# 1. makes the base image (deploy/offline/build-base-image.sh),
# 2. puts the CPU torch wheel into deploy/wheelhouse/ (pip copies it from a local
#    wheel cache or find-links folder when one has it, else downloads it),
# 3. builds the unchanged deploy/Dockerfile targets with torch taken from that folder.
#
# Usage: deploy/offline/build-images.sh [TAG]
#   -> dmoe-dht:TAG, dmoe-expert:TAG, dmoe-trainer:TAG, dmoe-prometheus:TAG
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:-latest}
torch_version=${TORCH_VERSION:-2.13.0}

deploy/offline/build-base-image.sh
if ! ls deploy/wheelhouse/torch-"$torch_version"*.whl >/dev/null 2>&1; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    -d deploy/wheelhouse "torch==$torch_version"
fi
for target in dht expert trainer; do
  echo "building dmoe-$target:$tag"
  docker build --quiet -f deploy/Dockerfile --target "$target" \
    --build-arg TORCH_INDEX_URL= --build-arg TORCH_VERSION="$torch_version" \
    -t "dmoe-$target:$tag" . >/dev/null
done
echo "building dmoe-prometheus:$tag (Debian's prometheus package)"
docker build --quiet -f deploy/prometheus/Dockerfile.offline -t "dmoe-prometheus:$tag" \
  deploy/prometheus >/dev/null
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^dmoe-' || true
