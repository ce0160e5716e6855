"""The trainer service and the client library for Decentralized Mixture-of-Experts layers.

Users' own models import :class:`Swarm`, :class:`RemoteExpert`,
:class:`RemoteMixtureOfExperts`, :class:`RemoteSwitchMixtureOfExperts` and :class:`CallPolicy`
from here.
Imports are lazy so ``python -m services.trainer --help`` stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CallPolicy",
    "RemoteExpert",
    "RemoteMixtureOfExperts",
    "RemoteSwitchMixtureOfExperts",
    "Swarm",
]


def __getattr__(name: str) -> Any:
    if name == "CallPolicy":
        from services.trainer.options import CallPolicy

        return CallPolicy
    if name == "Swarm":
        from services.trainer.swarm import Swarm

        return Swarm
    if name == "RemoteExpert":
        from services.trainer.remote_expert import RemoteExpert

        return RemoteExpert
    if name in ("RemoteMixtureOfExperts", "RemoteSwitchMixtureOfExperts"):
        from services.trainer import moe

        return getattr(moe, name)
    raise AttributeError(name)
