"""Decentralized averaging of trainers' own parameters (issue 17, docs/averaging.md).

Numpy and grpc only, so averaging peers need not import torch; the trainer's glue that maps a
model's tensors onto the flat vector is :mod:`services.trainer.averaging`.
"""

from services.averaging.aggregate import Aggregation, aggregate
from services.averaging.averager import Averager
from services.averaging.rounds import AveragerConfig, PartResult, RoundResult

__all__ = ["Aggregation", "Averager", "AveragerConfig", "PartResult", "RoundResult", "aggregate"]
