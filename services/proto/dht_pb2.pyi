from . import link_pb2 as _link_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "address", "public_key")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    node_id: bytes
    address: str
    public_key: bytes
    def __init__(self, node_id: _Optional[bytes] = ..., address: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class ValueEntry(_message.Message):
    __slots__ = ("subkey", "value", "expiration", "owner", "signature")
    SUBKEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPIRATION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    subkey: bytes
    value: bytes
    expiration: float
    owner: bytes
    signature: bytes
    def __init__(self, subkey: _Optional[bytes] = ..., value: _Optional[bytes] = ..., expiration: _Optional[float] = ..., owner: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("sender", "nonce")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    sender: NodeInfo
    nonce: bytes
    def __init__(self, sender: _Optional[_Union[NodeInfo, _Mapping]] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("peer", "dht_time", "caller_host", "signature")
    PEER_FIELD_NUMBER: _ClassVar[int]
    DHT_TIME_FIELD_NUMBER: _ClassVar[int]
    CALLER_HOST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    peer: NodeInfo
    dht_time: float
    caller_host: str
    signature: bytes
    def __init__(self, peer: _Optional[_Union[NodeInfo, _Mapping]] = ..., dht_time: _Optional[float] = ..., caller_host: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class StoreItem(_message.Message):
    __slots__ = ("key_id", "entry", "in_cache", "demote", "demote_token")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    IN_CACHE_FIELD_NUMBER: _ClassVar[int]
    DEMOTE_FIELD_NUMBER: _ClassVar[int]
    DEMOTE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    key_id: bytes
    entry: ValueEntry
    in_cache: bool
    demote: bool
    demote_token: bytes
    def __init__(self, key_id: _Optional[bytes] = ..., entry: _Optional[_Union[ValueEntry, _Mapping]] = ..., in_cache: _Optional[bool] = ..., demote: _Optional[bool] = ..., demote_token: _Optional[bytes] = ...) -> None: ...

class StoreRequest(_message.Message):
    __slots__ = ("sender", "items", "replicas", "dht_time")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DHT_TIME_FIELD_NUMBER: _ClassVar[int]
    sender: NodeInfo
    items: _containers.RepeatedCompositeFieldContainer[StoreItem]
    replicas: int
    dht_time: float
    def __init__(self, sender: _Optional[_Union[NodeInfo, _Mapping]] = ..., items: _Optional[_Iterable[_Union[StoreItem, _Mapping]]] = ..., replicas: _Optional[int] = ..., dht_time: _Optional[float] = ...) -> None: ...

class StoreResponse(_message.Message):
    __slots__ = ("stored", "peer", "declined", "nearest", "demote_tokens")
    STORED_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    DECLINED_FIELD_NUMBER: _ClassVar[int]
    NEAREST_FIELD_NUMBER: _ClassVar[int]
    DEMOTE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[bool]
    peer: NodeInfo
    declined: _containers.RepeatedScalarFieldContainer[bool]
    nearest: _containers.RepeatedCompositeFieldContainer[FindResult]
    demote_tokens: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, stored: _Optional[_Iterable[bool]] = ..., peer: _Optional[_Union[NodeInfo, _Mapping]] = ..., declined: _Optional[_Iterable[bool]] = ..., nearest: _Optional[_Iterable[_Union[FindResult, _Mapping]]] = ..., demote_tokens: _Optional[_Iterable[bytes]] = ...) -> None: ...

class FindRequest(_message.Message):
    __slots__ = ("sender", "key_ids", "nodes_only", "max_nearest")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    NODES_ONLY_FIELD_NUMBER: _ClassVar[int]
    MAX_NEAREST_FIELD_NUMBER: _ClassVar[int]
    sender: NodeInfo
    key_ids: _containers.RepeatedScalarFieldContainer[bytes]
    nodes_only: bool
    max_nearest: int
    def __init__(self, sender: _Optional[_Union[NodeInfo, _Mapping]] = ..., key_ids: _Optional[_Iterable[bytes]] = ..., nodes_only: _Optional[bool] = ..., max_nearest: _Optional[int] = ...) -> None: ...

class FindResult(_message.Message):
    __slots__ = ("entries", "nearest")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEAREST_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ValueEntry]
    nearest: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, entries: _Optional[_Iterable[_Union[ValueEntry, _Mapping]]] = ..., nearest: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class FindResponse(_message.Message):
    __slots__ = ("results", "peer")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[FindResult]
    peer: NodeInfo
    def __init__(self, results: _Optional[_Iterable[_Union[FindResult, _Mapping]]] = ..., peer: _Optional[_Union[NodeInfo, _Mapping]] = ...) -> None: ...

class PutItem(_message.Message):
    __slots__ = ("key", "entry")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    entry: ValueEntry
    def __init__(self, key: _Optional[bytes] = ..., entry: _Optional[_Union[ValueEntry, _Mapping]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PutItem]
    def __init__(self, items: _Optional[_Iterable[_Union[PutItem, _Mapping]]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored", "replicas", "dht_time")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DHT_TIME_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[bool]
    replicas: _containers.RepeatedScalarFieldContainer[int]
    dht_time: float
    def __init__(self, stored: _Optional[_Iterable[bool]] = ..., replicas: _Optional[_Iterable[int]] = ..., dht_time: _Optional[float] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("keys", "latest")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    latest: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., latest: _Optional[bool] = ...) -> None: ...

class GetResult(_message.Message):
    __slots__ = ("found", "entries")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    found: bool
    entries: _containers.RepeatedCompositeFieldContainer[ValueEntry]
    def __init__(self, found: _Optional[bool] = ..., entries: _Optional[_Iterable[_Union[ValueEntry, _Mapping]]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("results", "dht_time")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DHT_TIME_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[GetResult]
    dht_time: float
    def __init__(self, results: _Optional[_Iterable[_Union[GetResult, _Mapping]]] = ..., dht_time: _Optional[float] = ...) -> None: ...

class NodeStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatusResponse(_message.Message):
    __slots__ = ("node", "routing_table_size", "stored_records", "joined", "peers", "dht_time", "clock_correction")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ROUTING_TABLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    STORED_RECORDS_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    DHT_TIME_FIELD_NUMBER: _ClassVar[int]
    CLOCK_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    routing_table_size: int
    stored_records: int
    joined: bool
    peers: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    dht_time: float
    clock_correction: float
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., routing_table_size: _Optional[int] = ..., stored_records: _Optional[int] = ..., joined: _Optional[bool] = ..., peers: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., dht_time: _Optional[float] = ..., clock_correction: _Optional[float] = ...) -> None: ...
