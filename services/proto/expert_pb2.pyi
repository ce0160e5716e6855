from . import link_pb2 as _link_pb2
from . import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ("uid",)
    UID_FIELD_NUMBER: _ClassVar[int]
    uid: str
    def __init__(self, uid: _Optional[str] = ...) -> None: ...

class TensorSchema(_message.Message):
    __slots__ = ("shape", "dtype")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: _tensor_pb2.DType
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("uid", "expert_class", "inputs", "outputs", "num_parameters", "optimizer_steps", "max_batch_size", "public_key")
    UID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CLASS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    uid: str
    expert_class: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSchema]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSchema]
    num_parameters: int
    optimizer_steps: int
    max_batch_size: int
    public_key: bytes
    def __init__(self, uid: _Optional[str] = ..., expert_class: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSchema, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSchema, _Mapping]]] = ..., num_parameters: _Optional[int] = ..., optimizer_steps: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class ExpertRequest(_message.Message):
    __slots__ = ("uid", "tensors", "reply_compression")
    UID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    REPLY_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    uid: str
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    reply_compression: _tensor_pb2.Compression
    def __init__(self, uid: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., reply_compression: _Optional[_Union[_tensor_pb2.Compression, str]] = ...) -> None: ...

class ExpertResponse(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "total_bytes", "max_chunk_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_bytes: int
    max_chunk_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...
