"""One averaging peer as its own process, for ``benchmarks/averaging.py`` and the tests.

It serves ``dmoe.Averager`` on a gRPC port (the common server bootstrap, as a trainer does), talks
to the DHT nodes given, and runs ``--rounds`` rounds. Its identity is derived from ``--index``
(so every peer knows every other's key), and so are its inputs: in matchmaking slot ``slot``
peer ``i`` averages ``roll(B, shift(i, slot))`` with weight ``weight(i)``, ``B`` one standard
normal vector of ``--size`` values (or the hivemind benchmark's 13 tensors per layer). Each peer can
therefore compute the exact weighted mean of whoever its result holds, part by part, and
reports the largest difference (``max_abs_error``). Without torch: numpy and grpc only.

Test-only behaviours (``--hostile``, one mode per round): ``huge`` (1e30), ``nan``,
``wrong-size``, ``noise`` (100x standard normal), each claiming weight 1e6; ``bad-reducer``
(contributes honestly, answers noise for the part it reduces); ``die`` (sends its
slices, never answers for its own part, and SIGKILLs itself when the others have reduced its
slices: a member killed mid-round).

Synchronisation: writes ``<out>.ready`` when serving, starts its rounds when ``--go-file``
exists (JSON: ``first_slot``, the slot of every peer's first round), writes ``--out`` (JSON) at
the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from services.averaging import Aggregation, Averager, AveragerConfig  # noqa: E402
from services.averaging.wire import encode  # noqa: E402
from services.common.identity import Identity  # noqa: E402
from services.common.server import start_server  # noqa: E402
from services.dht.client import DHTClient  # noqa: E402
from services.proto import averager_pb2, tensor_pb2  # noqa: E402

HOSTILE_WEIGHT = 1e6


def identity_of(index: int) -> Identity:
    seed = hashlib.sha256(f"dmoe-averaging-peer-{index}".encode()).digest()
    return Identity(Ed25519PrivateKey.from_private_bytes(seed))


def hivemind_sizes(hid: int, layers: int) -> list[int]:
    """Element counts of the 13 tensors per layer of hivemind's benchmark_averaging.py."""
    per_layer = [
        hid * 3 * hid, 3 * hid, 3 * hid, hid * hid, hid, hid, hid * 4 * hid, 4 * hid, 4 * hid,
        2 * hid * hid * 2, hid, hid, hid,
    ]  # fmt: skip
    return per_layer * layers


def base_vector(size: int) -> np.ndarray:
    return np.random.default_rng(12345).standard_normal(size, dtype=np.float32)


def shift(index: int, round_: int, size: int) -> int:
    return (7919 * (index + 1) + 104729 * round_) % size


def weight_of(index: int, weights: str) -> float:
    return 1.0 if weights == "equal" else float(index + 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--initial-peers", required=True, help="DHT nodes, comma-separated")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--peers", type=int, required=True, help="peers in the run (their keys)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=0, help="vector size (0: --hid-size layout)")
    p.add_argument("--hid-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--target-group-size", type=int, default=4)
    p.add_argument("--window", type=float, default=2.0)
    p.add_argument("--reduce-timeout", type=float, default=10.0)
    p.add_argument("--compression", choices=["none", "float16"], default="float16")
    p.add_argument("--weights", choices=["equal", "index"], default="equal")
    p.add_argument("--robust", type=int, default=1)
    p.add_argument("--run-id", default="bench")
    p.add_argument("--hostile", default="", help="modes per round, comma-separated (tests)")
    p.add_argument("--hostile-peer", type=int, default=-1, help="which peer is hostile")
    p.add_argument("--go-file", required=True)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def check(
    result: Any,
    vector: np.ndarray,
    keys: dict[bytes, int],
    args: argparse.Namespace,
    base: np.ndarray,
) -> dict[str, Any]:
    """Compare a round's result with the exact weighted mean of its contributors, part by
    part; with a hostile peer, also with the honest members' mean and the bound."""
    out: dict[str, Any] = {}
    errors, honest_errors, bounds = [0.0], [], []
    for part in result.parts:
        idx = [keys[k] for k in part.contributors]
        sl = slice(part.start, part.end)
        got = result.vector[sl].astype(np.float64)
        ws = [weight_of(i, args.weights) for i in idx]
        want = sum(w * np.roll(base, shift(i, result.slot, len(base)))[sl] for w, i in
                   zip(ws, idx, strict=True)) / sum(ws)  # fmt: skip
        if args.hostile_peer not in idx:
            errors.append(float(np.abs(got - want).max()))
        if args.hostile_peer >= 0:
            honest = [i for i in keys.values() if i != args.hostile_peer and keys_in(result, i,
                      keys)]  # fmt: skip
            hw = [weight_of(i, args.weights) for i in honest]
            mean = sum(w * np.roll(base, shift(i, result.slot, len(base)))[sl]
                       for w, i in zip(hw, honest, strict=True)) / sum(hw)  # fmt: skip
            honest_errors.append(float(np.linalg.norm(got - mean)))
            # the hostile peer's weight counts at most 2x the median weight (Aggregation)
            bounds.append(2.0 * max(hw) / sum(hw) * part.radius)
    out["max_abs_error"] = max(errors)
    if args.hostile_peer >= 0:
        out["honest_error"], out["bound"] = honest_errors, bounds
    return out


def keys_in(result: Any, index: int, keys: dict[bytes, int]) -> bool:
    return any(keys.get(k) == index for k in result.group)


async def main(args: argparse.Namespace) -> None:
    identity = identity_of(args.index)
    keys = {identity_of(i).public_key: i for i in range(args.peers)}
    size = args.size or sum(hivemind_sizes(args.hid_size, args.num_layers))
    base = base_vector(size)
    dht_peers = args.initial_peers.split(",")
    rot = args.index % len(dht_peers)
    dht = DHTClient(dht_peers[rot:] + dht_peers[:rot], timeout=10.0, identity=identity)
    config = AveragerConfig(
        run_id=args.run_id, target_group_size=args.target_group_size, window=args.window,
        reduce_timeout=args.reduce_timeout, compression=args.compression,
        aggregation=Aggregation(robust=bool(args.robust)),
    )  # fmt: skip
    averager = Averager(config, size=size, dht=dht, identity=identity, address="")
    server = await start_server("trainer", averager.register, host="127.0.0.1", port=0,
                                metrics_port=-1, links=[averager.link])  # fmt: skip
    averager.address = f"127.0.0.1:{server.port}"
    await dht.get(["warm-up"])  # the link to the DHT is open before the clock starts
    Path(args.out + ".ready").write_text(averager.address)
    while not os.path.exists(args.go_file):
        await asyncio.sleep(0.02)
    first_slot = int(json.loads(Path(args.go_file).read_text())["first_slot"])
    started = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_at_go = usage.ru_utime + usage.ru_stime
    modes = args.hostile.split(",") if args.hostile else []
    rounds = []
    for r in range(args.rounds):
        mode = modes[r] if r < len(modes) else ""
        # every peer's first round is the slot the driver named: a peer that noticed the start
        # late does not fall into the next slot alone
        slot = first_slot if r == 0 else averager.next_slot()
        vector = np.roll(base, shift(args.index, slot, size))
        weight = weight_of(args.index, args.weights)
        restore = make_hostile(averager, mode, args) if mode else None
        result = await averager.step(vector, weight, slot=slot)
        if restore:
            restore()
        entry: dict[str, Any] = {
            "round": r, "slot": result.slot, "outcome": result.outcome,
            "group": sorted(keys.get(k, -1) for k in result.group), "seconds": result.seconds,
            "reason": result.reason, "mode": mode,
        }  # fmt: skip
        final = result.vector if result.vector is not None else vector
        entry["finite"] = bool(np.isfinite(final).all())
        entry["digest"] = hashlib.sha256(final.tobytes()).hexdigest()
        entry["kept_own"] = result.vector is None
        if result.outcome == "ok" and not mode:
            entry.update(check(result, vector, keys, args, base))
        rounds.append(entry)
    wall = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {"index": args.index, "rounds": rounds, "wall_s": wall,
              "cpu_s": usage.ru_utime + usage.ru_stime - cpu_at_go,
              "cpu_with_startup_s": usage.ru_utime + usage.ru_stime, "size": size}  # fmt: skip
    Path(args.out).write_text(json.dumps(report))
    await averager.close()
    await server.stop(0.5)
    await dht.close()


def make_hostile(averager: Averager, mode: str, args: argparse.Namespace) -> Any:
    """Make this peer's next round hostile; returns the undo."""
    rng = np.random.default_rng(args.index)
    honest_encode, honest_remote = averager.encode, averager._remote_part
    fp32 = tensor_pb2.COMPRESSION_NONE

    def corrupt(v: np.ndarray) -> Any:
        if mode == "huge":
            return encode(np.full_like(v, 1e30), fp32)
        if mode == "nan":
            bad = v.copy()
            bad[:: max(1, len(v) // 7)] = np.nan
            return encode(bad, fp32)
        if mode == "wrong-size":
            return encode(np.concatenate([v, v[:3]]), averager.compression)
        if mode == "noise":
            return encode(100 * rng.standard_normal(len(v), dtype=np.float32), fp32)
        return honest_encode(v)

    async def remote(round_: Any, part: int, vector: np.ndarray, weight: float) -> Any:
        claimed = HOSTILE_WEIGHT if mode != "die" else weight
        result = await honest_remote(round_, part, vector, claimed)
        if mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    async def never(request: Any, peer: str) -> Any:
        await asyncio.Event().wait()

    async def lying(payload: bytes, peer: str) -> bytes:
        # reduces honestly, then answers with noise of the right size
        reply = averager_pb2.ReduceReply.FromString(await honest_reduce(payload, peer))
        n = reply.values.shape[0]
        reply.values.CopyFrom(encode(100 * rng.standard_normal(n, dtype=np.float32), fp32))
        return reply.SerializeToString()

    honest_reduce = averager.link.methods["Reduce"]
    if mode == "bad-reducer":  # an honest contributor that lies about the part it reduces
        averager.link.methods["Reduce"] = lying
    else:
        averager.encode = corrupt
        averager._remote_part = remote  # type: ignore[method-assign]
    if mode == "die":
        averager.link.methods["Reduce"] = never

    def undo() -> None:
        averager.encode = honest_encode
        averager._remote_part = honest_remote  # type: ignore[method-assign]
        averager.link.methods["Reduce"] = honest_reduce

    return undo


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
