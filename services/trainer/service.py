"""gRPC ``dmoe.Trainer``: a read-only view of a trainer's progress (plus health, from bootstrap)."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from services.proto import trainer_pb2, trainer_pb2_grpc
from services.trainer.train import Trainer


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    def __init__(
        self, trainer: Trainer, model: str, dataset: str, public_key: bytes = b"",
        run_id: str = "",
    ) -> None:  # fmt: skip
        self.trainer, self.model, self.dataset = trainer, model, dataset
        self.run_id = run_id
        self.public_key = public_key
        self.started = time.time()

    async def Status(
        self, request: trainer_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.StatusResponse:
        state = self.trainer.snapshot()
        reply = trainer_pb2.StatusResponse(
            step=state.step,
            samples_seen=state.samples_seen,
            last_loss=state.last_loss,
            test_loss=state.test_loss,
            test_accuracy=state.test_accuracy,
            last_eval_step=state.last_eval_step,
            experts_in_use=state.experts_in_use,
            experts_called=state.experts_called,
            model=self.model,
            dataset=self.dataset,
            state=state.state,
            steps_per_second=state.steps_per_second,
            failed_steps=state.failed_steps,
            uptime_seconds=time.time() - self.started,
            public_key=self.public_key,
        )
        averaging = self.trainer.averaging
        if averaging is not None:
            out = reply.averaging
            out.run_id = self.run_id
            out.rounds_ok = averaging.rounds.get("ok", 0)
            out.rounds_alone = averaging.rounds.get("alone", 0)
            out.rounds_failed = averaging.rounds.get("failed", 0)
            last = averaging.last
            if last is not None:
                out.last_outcome, out.last_round = last.outcome, last.slot
                out.last_group_size, out.last_round_seconds = last.group_size, last.seconds
                out.last_round_time, out.last_failure = last.finished_at, last.reason[:500]
        return reply


def registrar(servicer: TrainerServicer) -> Callable[[grpc.aio.Server], list[str]]:
    def register(server: grpc.aio.Server) -> list[str]:
        trainer_pb2_grpc.add_TrainerServicer_to_server(servicer, server)
        return [trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name]

    return register
