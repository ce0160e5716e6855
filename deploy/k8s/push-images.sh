#!/usr/bin/env bash
# Build the dmoe images and push them to a registry your cluster pulls from, then point
# the Kubernetes manifests at it (deploy/k8s/components/images).
#
#   deploy/k8s/push-images.sh REGISTRY [TAG]     # e.g. ghcr.io/you  (TAG: the git commit)
#
# Builds dmoe-dht, dmoe-expert (CPU torch), dmoe-expert-cuda (CUDA torch wheels from
# TORCH_INDEX_URL, default .../whl/cu128: pick a CUDA version your nodes' driver supports)
# and dmoe-trainer from deploy/Dockerfile, pushes
# REGISTRY/<image>:TAG (log in first: docker login REGISTRY), and rewrites the images
# component so `kubectl apply -k deploy/k8s/overlays/{cpu,gpu,tls}` uses them.
# DMOE_SKIP_CUDA=1 skips the CUDA image (CPU clusters).
set -euo pipefail
cd "$(dirname "$0")/../.."

registry=${1:?usage: deploy/k8s/push-images.sh REGISTRY [TAG]}
registry=${registry%/}
tag=${2:-$(git rev-parse --short HEAD 2>/dev/null || echo latest)}
cuda_index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}

build() {  # build TARGET IMAGE [docker build args...]
  local target=$1 image=$2
  shift 2
  echo "building $registry/$image:$tag" >&2
  docker build -f deploy/Dockerfile --target "$target" -t "$registry/$image:$tag" "$@" .
  docker push "$registry/$image:$tag"
}

build dht dmoe-dht
build expert dmoe-expert
build trainer dmoe-trainer
if [ -z "${DMOE_SKIP_CUDA:-}" ]; then
  build expert dmoe-expert-cuda --build-arg TORCH_INDEX_URL="$cuda_index"
fi
python3 deploy/k8s/set_images.py "$registry" --tag "$tag"
echo "next: kubectl apply -k deploy/k8s/overlays/gpu   (or overlays/cpu)" >&2
