from . import link_pb2 as _link_pb2
from . import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AveragerAnnounce(_message.Message):
    __slots__ = ("address", "size", "step")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    address: str
    size: int
    step: int
    def __init__(self, address: _Optional[str] = ..., size: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class ReduceRequest(_message.Message):
    __slots__ = ("run_id", "round", "group", "sender", "part", "chunk", "weight", "values", "signature")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    group: bytes
    sender: bytes
    part: int
    chunk: int
    weight: float
    values: _tensor_pb2.Tensor
    signature: bytes
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., group: _Optional[bytes] = ..., sender: _Optional[bytes] = ..., part: _Optional[int] = ..., chunk: _Optional[int] = ..., weight: _Optional[float] = ..., values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ReduceReply(_message.Message):
    __slots__ = ("values", "contributors", "clip_radius")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    CLIP_RADIUS_FIELD_NUMBER: _ClassVar[int]
    values: _tensor_pb2.Tensor
    contributors: _containers.RepeatedScalarFieldContainer[int]
    clip_radius: float
    def __init__(self, values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., contributors: _Optional[_Iterable[int]] = ..., clip_radius: _Optional[float] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class StateTensor(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("tensors", "step", "samples_seen", "data")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_SEEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[StateTensor]
    step: int
    samples_seen: int
    data: bytes
    def __init__(self, tensors: _Optional[_Iterable[_Union[StateTensor, _Mapping]]] = ..., step: _Optional[int] = ..., samples_seen: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
