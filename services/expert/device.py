"""Which torch device an expert server computes on: ``--device cpu|cuda[:n]|auto``.

``auto`` picks the first CUDA device when torch sees one and the CPU otherwise, so one pod
spec (deploy/k8s) runs on CPU and GPU nodes alike. An explicit ``cuda`` that torch cannot use
(a CPU build of torch, no driver, no GPU given to the container) is refused at start with a
clear message rather than failing the first batch: on a GPU node pool, running on the CPU by
accident would be a silent slowdown by orders of magnitude.
"""

from __future__ import annotations

import argparse
import re

_NAME = re.compile(r"cpu|auto|cuda(:\d+)?")


def device_name(text: str) -> str:
    """``--device`` syntax (argparse ``type=``): cpu, cuda, cuda:N or auto; no torch import."""
    name = text.strip().lower()
    if not _NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {text!r}")
    return name


def resolve_device(name: str) -> str:
    """The device to use for ``name`` (as :func:`device_name` returns it); ``ValueError``
    when CUDA is asked for and torch cannot use it, or the index is out of range."""
    import torch

    name = device_name(name)
    if name == "cpu":
        return name
    available = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if available else "cpu"
    if not available:
        built = torch.version.cuda
        why = f"torch {torch.__version__} is a CPU build" if built is None else "no GPU is visible"
        raise ValueError(
            f"--device {name}: CUDA is not available ({why}); use --device auto or cpu"
        )
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible"
        )
    return name
