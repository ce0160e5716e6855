"""Point the Kubernetes manifests at a registry: rewrite deploy/k8s/components/images.

    python deploy/k8s/set_images.py REGISTRY [--tag TAG] [--dir DIR]

Every overlay includes that component, so after this `kubectl apply -k deploy/k8s/overlays/gpu`
pulls REGISTRY/dmoe-dht:TAG, REGISTRY/dmoe-expert-cuda:TAG, ... (what `kustomize edit set
image` would write, without needing kustomize). deploy/k8s/push-images.sh calls it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

COMPONENT = Path(__file__).resolve().parent / "components" / "images"
IMAGES = ("dmoe-dht", "dmoe-expert", "dmoe-expert-cuda", "dmoe-trainer")
HEADER_END = "apiVersion:"


def render(registry: str, tag: str, header: str) -> str:
    prefix = registry.rstrip("/") + "/" if registry else ""
    images = [{"name": n, "newName": prefix + n, "newTag": tag} for n in IMAGES]
    body = {"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component", "images": images}
    return header + yaml.safe_dump(body, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("registry", help="e.g. ghcr.io/you or registry.example.com:5000/dmoe")
    parser.add_argument("--tag", default="latest")
    parser.add_argument("--dir", type=Path, default=COMPONENT, help="the images component")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[a-z0-9][a-z0-9._:/-]*", args.registry.rstrip("/")):
        parser.error(f"not a registry name: {args.registry!r}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", args.tag):
        parser.error(f"not an image tag: {args.tag!r}")
    path = args.dir / "kustomization.yaml"
    text = path.read_text()
    header = text[: text.index(HEADER_END)]
    path.write_text(render(args.registry, args.tag, header))
    print(f"{path}: images from {args.registry.rstrip('/')}/...:{args.tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
