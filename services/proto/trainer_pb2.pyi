from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("step", "samples_seen", "last_loss", "test_loss", "test_accuracy", "last_eval_step", "experts_in_use", "model", "dataset", "state", "steps_per_second", "failed_steps", "uptime_seconds", "public_key", "experts_called")
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
    def __init__(self, step: _Optional[int] = ..., samples_seen: _Optional[int] = ..., last_loss: _Optional[float] = ..., test_loss: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., last_eval_step: _Optional[int] = ..., experts_in_use: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., dataset: _Optional[str] = ..., state: _Optional[str] = ..., steps_per_second: _Optional[float] = ..., failed_steps: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., public_key: _Optional[bytes] = ..., experts_called: _Optional[_Iterable[str]] = ...) -> None: ...
