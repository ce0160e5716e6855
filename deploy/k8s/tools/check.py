"""``python -m deploy.k8s.tools.check DIR [--gpu|--cpu] [--versions 1.25,1.37]``: render a
kustomize directory, validate every object against the Kubernetes schemas of the given
versions (default: the oldest and newest supported), run the cross-object checks.
Exit status 1 when anything is wrong; run from the repository root (the checks import the
services' argument parsers)."""

from __future__ import annotations

import argparse
import sys
import time

from deploy.k8s.tools import checks, schema
from deploy.k8s.tools.render import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="kustomize directory, e.g. deploy/k8s/overlays/gpu")
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument(
        "--gpu", dest="gpu", action="store_true", default=None, help="expect expert pods on GPUs"
    )
    gpu.add_argument("--cpu", dest="gpu", action="store_false", help="expect no GPUs at all")
    parser.add_argument(
        "--versions", default=None, help="Kubernetes minor versions, comma separated"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    objects = render(args.directory)
    known = schema.versions()
    versions = args.versions.split(",") if args.versions else [known[0], known[-1]]
    found = [e for v in versions for e in schema.validate_all(objects, v)]
    found += checks.problems(objects, gpu=args.gpu)
    for line in found:
        print(line)
    print(
        f"{len(objects)} objects, Kubernetes {', '.join(versions)}, {len(checks.names())} "
        f"checks: {len(found)} problems ({time.monotonic() - started:.1f} s)"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
