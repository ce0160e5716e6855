"""Write the JSON schemas of the CRDs deploy/k8s uses into deploy/k8s/tools/schemas/.

``kubernetes-validate`` carries only built-in kinds. The Prometheus Operator's ServiceMonitor
schema comes from the pydantic models the ``cloudcoil-models-prometheus-operator`` package
generates from the operator's CRDs; here every object that lists its properties is made to
forbid others, as the API server's strict field validation does, so a misspelt field fails.

    pip install cloudcoil-models-prometheus-operator==0.80.1.0
    python scripts/gen_crd_schemas.py          # --check: exit 1 when the files differ
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "tools" / "schemas"
VERSION = "0.80.1.0"  # cloudcoil-models-prometheus-operator (Prometheus Operator 0.80.1)


def strict(node: Any) -> Any:
    """Forbid unknown fields in every object schema that declares its properties."""
    if isinstance(node, dict):
        node = {k: strict(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def schemas() -> dict[str, str]:
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    schema = strict(ServiceMonitor.model_json_schema(by_alias=True))
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = (
        f"ServiceMonitor monitoring.coreos.com/v1, from cloudcoil-models-prometheus-operator "
        f"{VERSION} (scripts/gen_crd_schemas.py); unknown fields forbidden"
    )
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return {"servicemonitor-monitoring.coreos.com-v1.json": json.dumps(schema, indent=1) + "\n"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    stale = []
    for name, text in schemas().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for name in stale:
        print(f"stale: {OUT / name}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
