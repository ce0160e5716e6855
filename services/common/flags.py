"""Command-line flags that fall back to ``DMOE_<FLAG>`` environment variables.

Every service builds its parser with :func:`service_parser`. A flag given on the
command line wins over the environment, which wins over the built-in default.
Environment values go through the same ``type=`` conversion as command-line
values, so a bad ``DMOE_PORT=abc`` fails exactly like ``--port abc``.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
from collections.abc import Callable
from typing import Any

from services.common.addresses import check_peer_address
from services.common.identity import add_identity_flags
from services.common.limits import ServerLimits
from services.common.tls import add_tls_flags

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(flag: str) -> str:
    """``--metrics-port`` -> ``DMOE_METRICS_PORT``."""
    return "DMOE_" + flag.lstrip("-").replace("-", "_").upper()


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false), got {text!r}")


def peer_list(text: str) -> list[str]:
    """Parse ``host:port`` peers separated by commas or spaces."""
    peers = [p for p in text.replace(",", " ").split() if p]
    for peer in peers:
        try:
            check_peer_address(peer)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"peer {peer!r}: {exc}") from None
    return peers


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (value >= 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a number >= 0 (0: no limit), got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _long_flag(action: argparse.Action) -> str | None:
    return next((o for o in action.option_strings if o.startswith("--")), None)


class _EnvHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default and environment variable in ``--help``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = _long_flag(action)
        if flag is None or flag == "--help":
            return text
        if action.default is not None and action.nargs != 0 and "%(default)" not in text:
            text += " (default: %(default)s)"
        return f"{text} [env {env_name(flag)}]"


class EnvArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``--flags`` default to ``DMOE_<FLAG>`` variables.

    The environment is read at parse time, so flags added through argument groups
    are covered too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _EnvHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        for action in self._actions:
            flag = _long_flag(action)
            var = env_name(flag) if flag else None
            if var is None or flag == "--help" or var not in os.environ:
                continue
            raw = os.environ[var]
            if action.nargs == 0:  # store_true / store_false
                try:
                    given = parse_bool(raw)
                except argparse.ArgumentTypeError as exc:
                    self.error(f"{var}: {exc}")
                action.default = action.const if given else not action.const
            else:
                action.default = raw  # argparse applies type= to string defaults
        return super().parse_known_args(args, namespace)


def service_parser(
    service: str, description: str, *, port: int, metrics_port: int
) -> EnvArgumentParser:
    """A parser with the flags every service shares (docs/conventions.md, processes)."""
    parser = EnvArgumentParser(
        prog=f"python -m services.{service}",
        description=description,
    )
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="0.0.0.0", help="address the gRPC server binds")
    group.add_argument(
        "--announce-host",
        default=None,
        help="host others should use to reach this process (default: the bound host; "
        "when bound to all interfaces, this machine's address as its hostname resolves)",
    )
    group.add_argument("--port", type=int, default=port, help="gRPC port; 0 picks a free one")
    group.add_argument(
        "--metrics-port",
        type=int,
        default=metrics_port,
        help="Prometheus /metrics port; 0 picks a free one, -1 disables",
    )
    group.add_argument(
        "--max-message-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="largest gRPC message accepted or sent",
    )
    group.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        help="seconds in-flight calls get to finish on SIGTERM",
    )
    add_identity_flags(parser)
    limits, defaults = parser.add_argument_group("server limits (0: no limit)"), ServerLimits()
    count, rate = _non_negative(int), _non_negative(float)
    limits.add_argument("--max-concurrent-rpcs", type=count, default=defaults.max_concurrent_rpcs,
                        help="calls served at once, all callers together")  # fmt: skip
    limits.add_argument("--max-peer-rps", type=rate, default=defaults.max_peer_rps,
                        help="calls per second from one IP address, sustained")  # fmt: skip
    limits.add_argument("--max-peer-burst", type=count, default=defaults.max_peer_burst,
                        help="calls one IP may send at once (0: one second's worth)")  # fmt: skip
    limits.add_argument("--max-peer-streams", type=count, default=defaults.max_peer_streams,
                        help="streaming calls open at once from one IP")  # fmt: skip
    limits.add_argument("--max-peer-bytes-in-flight", type=count,
                        default=defaults.max_peer_bytes_in_flight,
                        help="request bytes held by the calls of one IP being served")  # fmt: skip
    logs = parser.add_argument_group("logging")
    logs.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        type=str.lower,
        help="log level",
    )
    logs.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="log line format"
    )
    add_tls_flags(parser)
    return parser


def announce_host(bind_host: str, announce: str | None) -> str:
    """The host part others should dial.

    Explicit ``--announce-host`` wins. A server bound to one address announces it. One bound
    to all interfaces announces this machine's address as its hostname resolves (in a
    container: the container's IP on its network), falling back to loopback.
    """
    if announce:
        return announce
    if bind_host not in ("0.0.0.0", "::", "[::]", ""):
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
