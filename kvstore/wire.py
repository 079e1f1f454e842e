"""Hand-written (de)serialisers for the two messages that carry blobs.

``PutRequest`` and ``GetResponse`` are almost entirely blob bytes. Going through
protobuf costs two extra copies of every blob at each end (build the message,
then serialise it; parse into the arena, then materialise the field), and at
1 MiB per message those copies, not the network, bound a loopback transfer. So
the server and both clients (sync and asyncio) move these two messages with the
functions here, one copy of the blob per side at most.

The bytes on the wire are exactly the proto's (``proto/kvstore/v1/kvstore.proto``
stays the contract; any protobuf client interoperates). Encoders emit fields in
number order and omit proto3 zero values, so their output is byte-identical to
``SerializeToString()``; parsers accept what protobuf accepts: anything this
scanner does not expect (a packed or repeated scalar, an odd encoding) is handed
to protobuf itself, which decides and explains. ``tests/unit/test_wire.py``
checks both directions against protobuf.
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeAlias

from kvstore.v1 import kvstore_pb2 as pb

#: Room a packed GetResponse keeps for its fields and per-blob tags under the message size limit
#: (GetRequest.pack_bytes is capped at the limit minus this, by the server and by the clients).
PACK_HEADROOM = 64 * 1024

#: Bytes a received Put message may hold beyond its blob for the server to keep a view of the message
#: instead of a copy of the blob (parse_put_request); real messages carry well under 100.
PIN_SLACK = 4096

#: A blob as the clients hand it out: ``bytes``, or a read-only view into a received message.
Blob: TypeAlias = bytes | memoryview

#: Field kinds the scanner understands: a uint32 varint, a length-delimited byte string, and a
#: repeated one (a list). The first two are the wire types, which the scanner checks.
_UINT32, _BYTES, _REPEATED_BYTES = 0, 2, -2


class PutRequestView(NamedTuple):
    """A ``kvstore.v1.PutRequest`` as plain values (``ack`` is a ``kvstore.v1.Ack`` number)."""

    namespace: str
    key: bytes
    layer: int
    num_layers: int
    blob: Blob
    commit: bool = False
    ack: int = 0

    @property
    def has_item(self) -> bool:
        """False for a bare commit message (no key, no blob): it ends the stream and stores nothing itself."""
        return bool(len(self.key) or len(self.blob) or self.namespace or self.layer or self.num_layers)


#: The bare message that ends a Put stream (PutRequest.commit); clients send it after the last blob.
def commit_request(ack: int = 0) -> PutRequestView:
    return PutRequestView("", b"", 0, 0, b"", True, ack)


class GetResponseView:
    """A parsed ``kvstore.v1.GetResponse``; blobs are read-only views into the received message.

    ``blob`` is set for a one-blob message, ``blobs`` (keys ``key_index``,
    ``key_index + 1``, ...) for a packed one. Mutable like a protobuf message
    (client interceptors may rewrite fields).
    """

    __slots__ = ("key_index", "layer", "blob", "blobs")

    def __init__(self, key_index: int, layer: int, blob: Blob, blobs: list[Blob] | None = None) -> None:
        self.key_index = key_index
        self.layer = layer
        self.blob = blob
        self.blobs = blobs if blobs is not None else []

    def __repr__(self) -> str:
        return (
            f"GetResponseView(key_index={self.key_index}, layer={self.layer}, blob=<{len(self.blob)} bytes>, "
            f"blobs=<{len(self.blobs)}>)"
        )


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _scan(data: bytes, kinds: dict[int, int]) -> dict[int, Any]:
    """Field number -> value (last one wins, as in protobuf) for the fields in ``kinds``.

    Byte strings come back as memoryviews into ``data``; unknown fields are
    skipped. Raises ValueError/IndexError on anything unusual so the caller can
    fall back to protobuf.
    """
    view = memoryview(data)
    fields: dict[int, Any] = {}
    pos, end = 0, len(data)
    while pos < end:
        tag, pos = _read_varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if not 0 < number < 1 << 29:
            raise ValueError(f"invalid field number {number}")  # protobuf rejects these too
        kind = kinds.get(number)
        if kind is not None and abs(kind) != wire_type:
            raise ValueError("wire type mismatch")  # e.g. a packed scalar: protobuf decides
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
            if kind is not None:
                fields[number] = value  # callers truncate to the field's type, as protobuf does
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            stop = pos + length
            if stop > end:
                raise ValueError("truncated field")
            if kind == _REPEATED_BYTES:
                fields.setdefault(number, []).append(view[pos:stop])
            elif kind is not None:
                fields[number] = view[pos:stop]
            pos = stop
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    if pos != end:
        raise ValueError("truncated message")
    return fields


_PUT_KINDS = {1: _BYTES, 2: _BYTES, 3: _UINT32, 4: _UINT32, 5: _BYTES, 6: _UINT32, 7: _UINT32}
_U32 = 0xFFFFFFFF
_GET_KINDS = {1: _UINT32, 2: _UINT32, 3: _BYTES, 4: _REPEATED_BYTES}


def parse_put_request(data: bytes) -> PutRequestView:
    """Server side: no copy; the blob is a read-only memoryview into ``data``.

    The store keeps that view as the blob (the RAM tier holds it as it is): the
    message it pins is the blob plus a header of well under a hundred bytes
    (namespace, key, two varints), so a copy here would cost a full pass over
    every blob for nothing (measured: docs/benchmarks.md, "Lean store path").
    A message carrying much more than its blob (unknown fields, a repeated blob
    field) gets its blob copied out instead, so a stored blob never pins more
    than :data:`PIN_SLACK` bytes beyond its own size.
    """
    try:
        f = _scan(data, _PUT_KINDS)
    except (IndexError, ValueError):  # unusual encodings: let protobuf decide (and explain)
        m = pb.PutRequest.FromString(data)
        return PutRequestView(m.namespace, m.key, m.layer, m.num_layers, m.blob, m.commit, m.ack)
    ack = f.get(7, 0) & _U32  # an enum is an int32: protobuf keeps unknown values, sign included
    blob = f.get(5, b"")
    if len(data) - len(blob) > PIN_SLACK:
        blob = bytes(blob)
    return PutRequestView(
        bytes(f.get(1, b"")).decode("utf-8"),
        bytes(f.get(2, b"")),
        f.get(3, 0) & _U32,
        f.get(4, 0) & _U32,
        blob,
        bool(f.get(6, 0)),
        ack - (1 << 32) if ack >> 31 else ack,
    )


def encode_put_request(request: PutRequestView) -> bytes:
    """Client side: one copy of the blob (into the message)."""
    namespace = request.namespace.encode("utf-8")
    head = bytearray()
    if namespace:
        head += b"\x0a" + _encode_varint(len(namespace)) + namespace
    if request.key:
        head += b"\x12" + _encode_varint(len(request.key)) + request.key
    if request.layer:
        head += b"\x18" + _encode_varint(request.layer)
    if request.num_layers:
        head += b"\x20" + _encode_varint(request.num_layers)
    if len(request.blob):
        head += b"\x2a" + _encode_varint(len(request.blob))
    if not (request.commit or request.ack):
        return b"".join((head, request.blob))
    tail = bytearray()
    if request.commit:
        tail += b"\x30\x01"
    if request.ack:
        tail += b"\x38" + _encode_varint(request.ack & 0xFFFFFFFFFFFFFFFF)  # int32: negatives take 10 bytes
    return b"".join((head, request.blob, tail))


def encode_get_response(item: tuple[int, int, Blob | list[Blob]]) -> bytes:
    """Server side: ``(key_index, layer, blob)`` as a GetResponse, one copy of the blob.

    A list in place of the blob is a packed response: the blobs go to the
    repeated ``blobs`` field (keys ``key_index``, ``key_index + 1``, ...).
    """
    key_index, layer, blob = item
    head = bytearray()
    if key_index:
        head += b"\x08" + _encode_varint(key_index)
    if layer:
        head += b"\x10" + _encode_varint(layer)
    if isinstance(blob, list):
        pieces: list[Blob | bytearray] = [head]
        for one in blob:
            pieces.append(b"\x22" + _encode_varint(len(one)))
            pieces.append(one)
        return b"".join(pieces)
    if len(blob):
        head += b"\x1a" + _encode_varint(len(blob))
    return b"".join((head, blob))


def parse_get_response(data: bytes) -> GetResponseView:
    """Client side: no copy; the blob is a read-only memoryview into ``data`` (which it keeps alive)."""
    try:
        f = _scan(data, _GET_KINDS)
    except (IndexError, ValueError):
        m = pb.GetResponse.FromString(data)
        return GetResponseView(m.key_index, m.layer, m.blob, list(m.blobs))
    return GetResponseView(f.get(1, 0) & _U32, f.get(2, 0) & _U32, f.get(3, b""), f.get(4))
