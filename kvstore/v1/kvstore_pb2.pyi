from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_MEMORY: _ClassVar[Tier]
    TIER_DISK: _ClassVar[Tier]
    TIER_REDIS: _ClassVar[Tier]
    TIER_S3: _ClassVar[Tier]

class Ack(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_UNSPECIFIED: _ClassVar[Ack]
    ACK_MEMORY: _ClassVar[Ack]
    ACK_DURABLE: _ClassVar[Ack]
TIER_UNSPECIFIED: Tier
TIER_MEMORY: Tier
TIER_DISK: Tier
TIER_REDIS: Tier
TIER_S3: Tier
ACK_UNSPECIFIED: Ack
ACK_MEMORY: Ack
ACK_DURABLE: Ack

class LookupRequest(_message.Message):
    __slots__ = ("namespace", "keys", "num_layers")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    num_layers: int
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., num_layers: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("num_present", "tiers")
    NUM_PRESENT_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    num_present: int
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    def __init__(self, num_present: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("namespace", "key", "layer", "num_layers", "blob", "commit", "ack")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    layer: int
    num_layers: int
    blob: bytes
    commit: bool
    ack: Ack
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., layer: _Optional[int] = ..., num_layers: _Optional[int] = ..., blob: _Optional[bytes] = ..., commit: _Optional[bool] = ..., ack: _Optional[_Union[Ack, str]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("num_stored", "bytes_stored", "tiers", "durable")
    NUM_STORED_FIELD_NUMBER: _ClassVar[int]
    BYTES_STORED_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    num_stored: int
    bytes_stored: int
    tiers: _containers.RepeatedScalarFieldContainer[str]
    durable: bool
    def __init__(self, num_stored: _Optional[int] = ..., bytes_stored: _Optional[int] = ..., tiers: _Optional[_Iterable[str]] = ..., durable: _Optional[bool] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace", "keys", "layer_start", "layer_end", "pack_bytes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    PACK_BYTES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    layer_start: int
    layer_end: int
    pack_bytes: int
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., pack_bytes: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("key_index", "layer", "blob", "blobs")
    KEY_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    key_index: int
    layer: int
    blob: bytes
    blobs: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, key_index: _Optional[int] = ..., layer: _Optional[int] = ..., blob: _Optional[bytes] = ..., blobs: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("namespace", "keys", "num_layers")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    num_layers: int
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., num_layers: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("num_deleted",)
    NUM_DELETED_FIELD_NUMBER: _ClassVar[int]
    num_deleted: int
    def __init__(self, num_deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "bytes", "objects", "capacity_bytes", "hits", "misses", "evictions", "errors", "integrity_failures", "healthy", "corrupt_records", "breaker_trips")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    INTEGRITY_FAILURES_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_RECORDS_FIELD_NUMBER: _ClassVar[int]
    BREAKER_TRIPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    bytes: int
    objects: int
    capacity_bytes: int
    hits: int
    misses: int
    evictions: int
    errors: int
    integrity_failures: int
    healthy: bool
    corrupt_records: int
    breaker_trips: int
    def __init__(self, name: _Optional[str] = ..., bytes: _Optional[int] = ..., objects: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., errors: _Optional[int] = ..., integrity_failures: _Optional[int] = ..., healthy: _Optional[bool] = ..., corrupt_records: _Optional[int] = ..., breaker_trips: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("tiers", "counters", "version")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TIERS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    counters: _containers.ScalarMap[str, int]
    version: str
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., counters: _Optional[_Mapping[str, int]] = ..., version: _Optional[str] = ...) -> None: ...
