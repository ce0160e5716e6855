"""Strict JSON-schema validation of rendered objects, offline.

Built-in kinds: the official schemas ``kubernetes-validate`` carries (one set per Kubernetes
minor version, the ``-strict`` variant: unknown fields are errors, as ``kubectl apply``'s
server-side field validation makes them). CRDs, which those schemas lack: the schemas
committed in ``schemas/`` (``scripts/gen_crd_schemas.py`` derives them from the Prometheus
Operator's published models, with unknown fields forbidden). An object of a kind neither
knows is an error, never silently skipped.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import referencing

SCHEMAS = Path(__file__).resolve().parent / "schemas"


def versions() -> list[str]:
    """Kubernetes minor versions with schemas (e.g. ['1.25', ..., '1.37'])."""
    from kubernetes_validate.utils import all_versions

    return sorted(
        {".".join(v.split(".")[:2]) for v in all_versions()},
        key=lambda v: tuple(map(int, v.split("."))),
    )


@cache
def _definitions(version: str) -> tuple[Path, referencing.Registry]:
    import kubernetes_validate

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    (folder,) = root.glob(f"v{version}.*-local-strict")
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
    return folder, registry


@cache
def _validator(version: str, kind: str, api_version: str) -> jsonschema.protocols.Validator:
    crd = SCHEMAS / f"{kind.lower()}-{api_version.replace('/', '-')}.json"
    if crd.exists():
        schema = json.loads(crd.read_text())
        return jsonschema.Draft202012Validator(schema)
    folder, registry = _definitions(version)
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = folder / f"{kind.lower()}-{group}.json"
    if not path.exists():
        raise LookupError(f"no schema for {kind} {api_version} in Kubernetes {version}")
    schema = json.loads(path.read_text())
    registry = referencing.Resource.from_contents(schema) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def errors(obj: dict[str, Any], version: str) -> list[str]:
    """Schema errors of one object for Kubernetes ``version`` ('1.37'); [] when valid."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    try:
        validator = _validator(version, obj["kind"], obj["apiVersion"])
    except LookupError as exc:
        return [f"{name}: {exc}"]
    return [
        f"{name} (Kubernetes {version}): {'.'.join(map(str, e.absolute_path)) or '<root>'}: "
        f"{e.message}"
        for e in validator.iter_errors(obj)
    ]


def validate_all(objects: list[dict[str, Any]], version: str) -> list[str]:
    return [error for obj in objects for error in errors(obj, version)]
