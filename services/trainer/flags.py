"""The trainer's command-line flags (``python -m services.trainer --help``).

Defaults come from the dataclasses in-process layers use (:mod:`services.trainer.options`), so
the CLI and the library agree; every flag also reads a ``DMOE_*`` environment variable through
the common :func:`~services.common.flags.service_parser`.
"""

from __future__ import annotations

import argparse
import re

from services.common.flags import parse_bool, peer_list, service_parser
from services.proto import tensor_pb2
from services.trainer.options import CallPolicy, MoEOptions

COMPRESSIONS = {
    "none": tensor_pb2.COMPRESSION_NONE,
    "float16": tensor_pb2.COMPRESSION_FLOAT16,
    "bfloat16": tensor_pb2.COMPRESSION_BFLOAT16,
    "uint8": tensor_pb2.COMPRESSION_UINT8,
}


def grid(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x") if d)
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid {text!r} is not like 4x4 or 32x32x32") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"grid {text!r} needs positive sizes")
    return dims


def run_id(text: str) -> str:
    if text and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        raise argparse.ArgumentTypeError("a run id is 1-64 letters, digits, '-' or '_'")
    return text


def build_parser() -> argparse.ArgumentParser:
    # the flags' defaults are the dataclasses' (what in-process layers use)
    layer, policy = MoEOptions(), CallPolicy()
    parser = service_parser(
        "trainer",
        "Train a model whose hidden layers are Decentralized Mixture-of-Experts layers: "
        "experts are found through the DHT and called over gRPC.",
        port=31350,
        metrics_port=9350,
    )
    swarm = parser.add_argument_group("swarm")
    swarm.add_argument(
        "--initial-peers", "--dht-peers", type=peer_list, default=[], help="DHT nodes, host:port"
    )
    swarm.add_argument(
        "--uid-prefix",
        default=layer.uid_prefix,
        help="expert grid of layer 0 (layer i: <prefix><i>)",
    )
    swarm.add_argument(
        "--grid", type=grid, default=layer.grid_size, help="grid size per dimension, e.g. 4x4"
    )
    swarm.add_argument(
        "--moe-kind", choices=["mixture", "switch"], default=layer.kind, help="layer type"
    )
    swarm.add_argument("--k-best", type=int, default=layer.k_best, help="experts chosen per sample")
    swarm.add_argument("--k-min", type=int, default=policy.k_min, help="answers each sample needs")
    swarm.add_argument(
        "--forward-timeout", type=float, default=policy.forward_timeout, help="seconds per forward"
    )
    swarm.add_argument(
        "--timeout-after-k-min",
        type=float,
        default=policy.timeout_after_k_min,
        help="extra wait for stragglers, seconds",
    )
    swarm.add_argument(
        "--transient-retries", type=int, default=policy.transient_retries,
        help="re-sends of a forward refused with UNAVAILABLE/RESOURCE_EXHAUSTED",
    )  # fmt: skip
    swarm.add_argument(
        "--forward-retries", type=int, default=policy.forward_retries,
        help="rounds with replacement experts for samples short of k-min",
    )  # fmt: skip
    swarm.add_argument(
        "--backward-k-min",
        type=int,
        default=policy.backward_k_min,
        help="backward answers per sample",
    )
    swarm.add_argument(
        "--backward-timeout",
        type=float,
        default=policy.backward_timeout,
        help="seconds per backward",
    )
    swarm.add_argument(
        "--allow-zero-outputs", type=parse_bool, default=policy.allow_zero_outputs,
        help="zeros instead of an error when fewer than k-min experts answer",
    )  # fmt: skip
    swarm.add_argument(
        "--detect-anomalies", type=parse_bool, default=policy.detect_anomalies,
        help="treat a non-finite or absurd expert answer (outputs, gradients) as a failed call",
    )  # fmt: skip
    swarm.add_argument(
        "--max-expert-value", type=float, default=policy.max_expert_value,
        help="an expert answer holding a larger |value| is absurd (0: no cap)",
    )  # fmt: skip
    swarm.add_argument(
        "--max-expert-rms-ratio", type=float, default=policy.max_expert_rms_ratio,
        help="an expert answer whose RMS exceeds this x the 90th percentile of recent answers "
        "(grid and method) is absurd (0: no relative check)",
    )  # fmt: skip
    swarm.add_argument(
        "--dht-cache-ttl", type=float, default=2.0, help="seconds DHT answers are reused"
    )
    swarm.add_argument(
        "--dht-negative-cache-ttl", type=float, default=10.0,
        help="seconds an empty DHT answer (a prefix with no live expert) is reused",
    )  # fmt: skip
    swarm.add_argument(
        "--backoff-base", type=float, default=1.0, help="first back-off of a failing expert, s"
    )
    swarm.add_argument("--backoff-max", type=float, default=60.0, help="longest back-off, s")
    swarm.add_argument(
        "--trusted-keys",
        default=None,
        help="file of public keys (one per line, hex or base64, # comments): use only experts "
        "declared by these keys (a private swarm); unset: any server's declarations",
    )
    swarm.add_argument(
        "--announce-period", type=float, default=10.0,
        help="seconds between announcements of this trainer under _dmoe.trainers in the DHT, "
        "for the swarm explorer (0: none)",
    )  # fmt: skip
    swarm.add_argument(
        "--compression",
        choices=list(COMPRESSIONS),
        default="none",
        help="tensor compression on the wire",
    )
    avg = parser.add_argument_group("averaging (docs/averaging.md)")
    avg.add_argument(
        "--average", type=parse_bool, default=True,
        help="average this trainer's own parameters (not the experts) with the trainers of its "
        "run, and download the state from one of them at start",
    )  # fmt: skip
    avg.add_argument(
        "--run-id", type=run_id, default="",
        help="trainers of one run average together; default derived from the model, data set "
        "and expert grid flags, so identical trainers share it",
    )  # fmt: skip
    avg.add_argument(
        "--target-group-size", type=int, default=8, help="trainers per averaging group (>= 2)"
    )
    avg.add_argument(
        "--average-every", type=int, default=10,
        help="local steps between the starts of two rounds (a round runs in the background)",
    )  # fmt: skip
    avg.add_argument(
        "--average-period", type=float, default=5.0,
        help="matchmaking slot, seconds of the DHT clock: trainers ready in the same slot "
        "average together; a round starts at most once per slot",
    )  # fmt: skip
    avg.add_argument(
        "--average-timeout", type=float, default=10.0,
        help="seconds reducers wait for the members' parts after a slot closes",
    )  # fmt: skip
    avg.add_argument(
        "--average-compression", choices=["none", "float16"], default="none",
        help="values on the wire while averaging",
    )  # fmt: skip
    avg.add_argument(
        "--robust-averaging", type=parse_bool, default=True,
        help="CenteredClip instead of a plain mean (bounds what one hostile member can do)",
    )  # fmt: skip
    avg.add_argument(
        "--clip-factor", type=float, default=3.0,
        help="CenteredClip radius, in median distances of the inputs to their median",
    )  # fmt: skip
    avg.add_argument(
        "--load-state", type=parse_bool, default=True,
        help="without a checkpoint to resume, download parameters, optimizer state and step "
        "from a peer of the run before training",
    )  # fmt: skip
    avg.add_argument(
        "--redownload-after", type=int, default=10,
        help="after this many rounds in a row without averaging (alone or failed), download "
        "the state from a peer of the run when one offers it; 0 never",
    )  # fmt: skip
    model = parser.add_argument_group("model and data")
    model.add_argument(
        "--model", choices=["mlp", "transformer"], default="mlp", help="architecture"
    )
    model.add_argument(
        "--model-module", default=None, help="a .py defining build_model(swarm, dataset, moe)"
    )
    model.add_argument(
        "--hidden-dim", type=int, default=64, help="width of the DMoE layers (= experts')"
    )
    model.add_argument("--num-layers", type=int, default=1, help="DMoE layers")
    model.add_argument(
        "--final-norm", type=parse_bool, default=False,
        help="mlp: LayerNorm before the output layer (the Learning@home paper's MNIST model)",
    )  # fmt: skip
    model.add_argument("--heads", type=int, default=2, help="attention heads (transformer)")
    model.add_argument(
        "--dataset", choices=["digits", "mnist", "text"], default="digits", help="data"
    )
    model.add_argument("--data-path", default=None, help="MNIST IDX directory or text file")
    model.add_argument("--seq-len", type=int, default=64, help="sequence length (text)")
    train = parser.add_argument_group("training")
    train.add_argument(
        "--steps", type=int, default=0, help="steps to train; 0 trains until stopped"
    )
    train.add_argument("--batch-size", type=int, default=64, help="samples per step")
    train.add_argument(
        "--lr", type=float, default=1e-3, help="Adam learning rate of local parameters"
    )
    train.add_argument(
        "--lr-decay", type=parse_bool, default=False,
        help="decay the learning rate linearly to 0 at --steps",
    )  # fmt: skip
    train.add_argument(
        "--lr-decay-steps", type=int, default=0,
        help="> 0: decay the learning rate linearly to 0 at this step, also when the trainer "
        "runs until stopped (--steps 0); the share of a run's updates this trainer will do",
    )  # fmt: skip
    train.add_argument(
        "--balancing-weight", type=float, default=0.01, help="switch balancing loss weight"
    )
    train.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps; 0 never")
    train.add_argument("--eval-batch-size", type=int, default=512, help="samples per eval batch")
    train.add_argument(
        "--seed", type=int, default=None,
        help="batch-order seed (and the initial parameters' without averaging); unset: the "
        "resumed checkpoint's, or drawn at random (and logged), so trainers of one swarm differ",
    )  # fmt: skip
    train.add_argument(
        "--init-seed", type=int, default=None,
        help="seed of the initial parameters; unset: drawn from the run id when averaging (all "
        "trainers of a run start from one model), else --seed",
    )  # fmt: skip
    train.add_argument(
        "--split-seed", type=int, default=0,
        help="train/test split seed (digits): the same for every trainer, so test sets agree",
    )  # fmt: skip
    train.add_argument(
        "--train-samples", type=int, default=0,
        help="train on the first N training samples (each trainer holds its data in memory); "
        "0: all",
    )  # fmt: skip
    train.add_argument(
        "--eval-samples", type=int, default=0,
        help="evaluate on the first N test samples; 0: the whole test set",
    )  # fmt: skip
    train.add_argument("--checkpoint-dir", default=None, help="where to checkpoint and resume from")
    train.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps")
    train.add_argument(
        "--history-file", default=None, help="JSON file rewritten at each evaluation"
    )
    train.add_argument(
        "--log-every", type=int, default=50, help="log a line every N steps (no tty)"
    )
    train.add_argument(
        "--max-consecutive-failures", type=int, default=0,
        help="exit with status 1 after this many skipped steps in a row; 0 never",
    )  # fmt: skip
    train.add_argument(
        "--failure-pause", type=float, default=0.5, help="pause after a skipped step, s"
    )
    return parser
