from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("step", "samples_seen", "last_loss", "test_loss", "test_accuracy", "last_eval_step", "experts_in_use", "model", "dataset", "state", "steps_per_second", "failed_steps", "uptime_seconds", "public_key", "experts_called", "averaging")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LAST_EVAL_STEP_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_IN_USE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    FAILED_STEPS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_CALLED_FIELD_NUMBER: _ClassVar[int]
    AVERAGING_FIELD_NUMBER: _ClassVar[int]
    step: int
    samples_seen: int
    last_loss: float
    test_loss: float
    test_accuracy: float
    last_eval_step: int
    experts_in_use: _containers.RepeatedScalarFieldContainer[str]
    model: str
    dataset: str
    state: str
    steps_per_second: float
    failed_steps: int
    uptime_seconds: float
    public_key: bytes
    experts_called: _containers.RepeatedScalarFieldContainer[str]
    averaging: AveragingStatus
    def __init__(self, step: _Optional[int] = ..., samples_seen: _Optional[int] = ..., last_loss: _Optional[float] = ..., test_loss: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., last_eval_step: _Optional[int] = ..., experts_in_use: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., dataset: _Optional[str] = ..., state: _Optional[str] = ..., steps_per_second: _Optional[float] = ..., failed_steps: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., public_key: _Optional[bytes] = ..., experts_called: _Optional[_Iterable[str]] = ..., averaging: _Optional[_Union[AveragingStatus, _Mapping]] = ...) -> None: ...

class AveragingStatus(_message.Message):
    __slots__ = ("run_id", "last_outcome", "last_round", "last_group_size", "last_round_seconds", "last_round_time", "rounds_ok", "rounds_alone", "rounds_failed", "last_failure")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_TIME_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_OK_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_ALONE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FAILED_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    last_outcome: str
    last_round: int
    last_group_size: int
    last_round_seconds: float
    last_round_time: float
    rounds_ok: int
    rounds_alone: int
    rounds_failed: int
    last_failure: str
    def __init__(self, run_id: _Optional[str] = ..., last_outcome: _Optional[str] = ..., last_round: _Optional[int] = ..., last_group_size: _Optional[int] = ..., last_round_seconds: _Optional[float] = ..., last_round_time: _Optional[float] = ..., rounds_ok: _Optional[int] = ..., rounds_alone: _Optional[int] = ..., rounds_failed: _Optional[int] = ..., last_failure: _Optional[str] = ...) -> None: ...
