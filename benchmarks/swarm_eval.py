"""The convergence benchmark's evaluator: the accuracy of the model a swarm trains, from outside.

A swarm of averaging trainers holds one model in several copies that drift apart between
averaging rounds. The evaluator takes a snapshot of every trainer's own parameters over the
averager's ``DownloadState`` RPC (the stream a newcomer loads its state from), averages them
with equal weights (the model the swarm converges to) and runs that model's forward through the
real expert servers, as a trainer would. Its total updates are the sum of the trainers' step
counters in the same snapshot, so an accuracy point is tied exactly to the work behind it.

Why outside the trainers: an evaluation inside a training process stops that trainer for as long
as it runs, and the curve would be one trainer's copy, not the swarm's model. Here the cost is
one process's forward passes (a few hundred ms of CPU per point on a subset) plus small state
downloads; the benchmark reports what share of the run they took.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from services.averaging.averager import SERVICE_NAME
from services.proto import averager_pb2
from services.trainer.data import Dataset
from services.trainer.dispatch import CallPolicy
from services.trainer.models import build_model
from services.trainer.options import MoEOptions
from services.trainer.swarm import Swarm


@dataclass
class Snapshot:
    time: float
    updates: int  # the sum of the trainers' steps
    steps: list[int]
    params: list[np.ndarray]  # the trainers' mean, in model.parameters() order


def download(address: str, run_id: str, timeout: float = 30.0) -> tuple[int, list[np.ndarray]]:
    """One trainer's (step, parameters) from its averager's ``DownloadState`` stream."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream(
            f"/{SERVICE_NAME}/DownloadState",
            request_serializer=averager_pb2.StateRequest.SerializeToString,
            response_deserializer=averager_pb2.StateChunk.FromString,
        )
        header, data = None, bytearray()
        for chunk in call(averager_pb2.StateRequest(run_id=run_id), timeout=timeout):
            header = header or chunk
            data += chunk.data
    if header is None:
        raise RuntimeError(f"{address}: empty state")
    arrays, offset = [], 0
    for tensor in header.tensors:
        count = int(np.prod(tensor.shape))
        if tensor.name.startswith("param."):
            flat = np.frombuffer(bytes(data[offset : offset + 4 * count]), dtype="<f4")
            arrays.append(flat.reshape(tuple(tensor.shape)).astype(np.float32))
        offset += 4 * count
    return int(header.step), arrays


class SwarmEvaluator:
    """Evaluates the averaged model of one swarm (one run id, one uid prefix)."""

    def __init__(
        self,
        dht: str,
        uid_prefix: str,
        run_id: str,
        trainers: list[str],
        dataset: Dataset,
        *,
        hidden: int,
        layers: int,
        grid: int,
        k_best: int,
        timeout: float,
        eval_batch: int = 1000,
    ) -> None:
        self.run_id, self.trainers, self.dataset = run_id, trainers, dataset
        self.eval_batch = eval_batch
        self.swarm = Swarm([dht])
        policy = CallPolicy(forward_timeout=timeout, timeout_after_k_min=timeout / 2)
        options = MoEOptions(grid_size=[grid], uid_prefix=uid_prefix, k_best=k_best, policy=policy)
        self.model = build_model(
            "mlp", self.swarm, dataset, options, hidden=hidden, layers=layers, final_norm=True
        )
        self.model.eval()
        self.cpu_seconds = 0.0  # spent evaluating, for the report

    def snapshot(self) -> Snapshot:
        steps, sums = [], None
        for address in self.trainers:
            step, params = download(address, self.run_id)
            steps.append(step)
            sums = params if sums is None else [a + b for a, b in zip(sums, params, strict=True)]
        assert sums is not None
        mean = [a / len(self.trainers) for a in sums]
        return Snapshot(time.time(), sum(steps), steps, mean)

    @torch.no_grad()
    def accuracy(self, snapshot: Snapshot, samples: int = 0, attempts: int = 3) -> float:
        """Accuracy on the first ``samples`` test samples (0: all); a batch the swarm drops is
        tried again (an evaluation measures the model, not one unlucky call)."""
        started = time.process_time()
        for param, value in zip(self.model.parameters(), snapshot.params, strict=True):
            param.copy_(torch.from_numpy(value))
        xs, ys = self.dataset.test_x, self.dataset.test_y
        if samples > 0:
            xs, ys = xs[:samples], ys[:samples]
        right = 0
        for start in range(0, len(ys), self.eval_batch):
            x, y = xs[start : start + self.eval_batch], ys[start : start + self.eval_batch]
            for attempt in range(attempts):
                try:
                    right += int((self.model(x).argmax(-1) == y).sum())
                    break
                except Exception:
                    if attempt + 1 == attempts:
                        raise
                    time.sleep(0.2)
        self.cpu_seconds += time.process_time() - started
        return right / len(ys)

    def close(self) -> None:
        self.swarm.close()
