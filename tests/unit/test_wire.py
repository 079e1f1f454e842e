"""kvstore.wire against protobuf itself: the hand-written (de)serialisers of the
two blob-carrying messages must produce and accept exactly the proto's bytes."""

from __future__ import annotations

import os

import pytest
from google.protobuf.message import DecodeError

from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import (
    PIN_SLACK,
    GetResponseView,
    PutRequestView,
    encode_get_response,
    encode_put_request,
    parse_get_response,
    parse_put_request,
)

NS = "acme/smollm2-L30/fp16"
# Fields 10..13 with every wire type the proto does not use: unknown to both messages.
UNKNOWN = b"\x50\x05" + b"\x5a\x03abc" + b"\x61" + bytes(8) + b"\x6d" + bytes(4)


def _put_fields(m: pb.PutRequest | PutRequestView) -> tuple:
    return (m.namespace, bytes(m.key), m.layer, m.num_layers, bytes(m.blob), bool(m.commit), int(m.ack))


def _get_fields(m: pb.GetResponse | GetResponseView) -> tuple:
    return (m.key_index, m.layer, bytes(m.blob))


@pytest.mark.parametrize("number", [0, 1, 127, 128, 4095, 2**32 - 1])
@pytest.mark.parametrize("size", [0, 1, 200, 70_000])
def test_both_messages_are_byte_identical_to_protobuf_both_ways(number: int, size: int) -> None:
    blob = os.urandom(size)
    key = os.urandom(32) if size else b""
    for layer in (0, 1, 300):
        put = pb.PutRequest(namespace=NS if size else "", key=key, layer=layer, num_layers=number, blob=blob)
        view = PutRequestView(put.namespace, key, layer, number, blob)
        assert encode_put_request(view) == put.SerializeToString()
        assert _put_fields(parse_put_request(put.SerializeToString())) == _put_fields(put)

        get = pb.GetResponse(key_index=number, layer=layer, blob=blob)
        assert encode_get_response((number, layer, blob)) == get.SerializeToString()
        assert encode_get_response((number, layer, memoryview(blob))) == get.SerializeToString()
        assert _get_fields(parse_get_response(get.SerializeToString())) == _get_fields(get)


def test_put_encoder_takes_any_bytes_like_blob() -> None:
    blob = os.urandom(1000)
    expected = pb.PutRequest(
        namespace=NS, key=b"k" * 32, layer=2, num_layers=4, blob=blob
    ).SerializeToString()
    for like in (bytearray(blob), memoryview(blob)):
        assert encode_put_request(PutRequestView(NS, b"k" * 32, 2, 4, like)) == expected


def test_parsers_handle_unusual_encodings_like_protobuf() -> None:
    a = pb.PutRequest(namespace=NS, key=b"k" * 32, layer=1, num_layers=2, blob=b"first").SerializeToString()
    b = pb.PutRequest(layer=3, blob=b"second").SerializeToString()
    big_varint = b"\x18\x80\x80\x80\x80\x10"  # layer = 2**32, truncated to uint32 like protobuf
    for data in (a + b, UNKNOWN + a, big_varint + a, a + big_varint):
        assert _put_fields(parse_put_request(data)) == _put_fields(pb.PutRequest.FromString(data))
    g = pb.GetResponse(key_index=7, layer=3, blob=b"payload").SerializeToString()
    packed_layer = b"\x12\x01\x05"  # field 2 as a packed (length-delimited) scalar: protobuf's path
    for data in (g + g, UNKNOWN + g, g + UNKNOWN, packed_layer + g, g + packed_layer):
        assert _get_fields(parse_get_response(data)) == _get_fields(pb.GetResponse.FromString(data))


@pytest.mark.parametrize("parse", [parse_put_request, parse_get_response])
def test_truncated_or_garbage_messages_raise_protobufs_error(parse) -> None:
    a = pb.PutRequest(namespace=NS, key=b"k" * 32, layer=1, num_layers=2, blob=b"x" * 100).SerializeToString()
    for data in (a[:-2], a[:3], b"\x07", b"\xff" * 11):
        with pytest.raises(DecodeError):
            parse(data)


def test_get_blob_is_a_view_into_the_received_message_not_a_copy() -> None:
    data = pb.GetResponse(key_index=1, layer=2, blob=os.urandom(4096)).SerializeToString()
    view = parse_get_response(data)
    assert isinstance(view.blob, memoryview) and view.blob.readonly
    assert view.blob.obj is data  # zero copy: the client hands the decoder gRPC's own buffer
    message = pb.PutRequest(namespace=NS, key=b"k" * 32, blob=b"b" * 64).SerializeToString()
    put = parse_put_request(message)
    # The server keeps a Put's blob as a view of the received message: no copy, and the message it
    # pins is the blob plus a header of a few dozen bytes.
    assert isinstance(put.blob, memoryview) and put.blob.readonly and put.blob.obj is message
    assert bytes(put.blob) == b"b" * 64 and len(message) - len(put.blob) < 100


def test_put_blob_is_copied_out_of_a_message_carrying_much_more_than_it() -> None:
    """A stored blob must never pin a large message: unknown fields or a repeated blob field beyond
    PIN_SLACK bytes get the blob its own bytes (the RAM tier's budget counts blob bytes only)."""
    blob = os.urandom(1000)
    padded = pb.PutRequest(namespace=NS, key=b"k" * 32, blob=os.urandom(PIN_SLACK)).SerializeToString()
    padded += pb.PutRequest(blob=blob).SerializeToString()  # the blob field twice: the last one wins
    padded += b"\x5a" + bytes([0x80, 0x40]) + bytes(8192)  # field 11, unknown, 8 KiB
    put = parse_put_request(padded)
    assert type(put.blob) is bytes and put.blob == blob
    assert _put_fields(put) == _put_fields(pb.PutRequest.FromString(padded))


@pytest.mark.parametrize("sizes", [[0], [1], [5, 0, 7], [70_000, 3, 200]])
def test_packed_get_response_is_byte_identical_to_protobuf(sizes: list[int]) -> None:
    blobs = [os.urandom(n) for n in sizes]
    for key_index, layer in ((0, 0), (5, 2), (4095, 300)):
        message = pb.GetResponse(key_index=key_index, layer=layer, blobs=blobs)
        assert (
            encode_get_response((key_index, layer, [memoryview(b) for b in blobs]))
            == message.SerializeToString()
        )
        view = parse_get_response(message.SerializeToString())
        assert (view.key_index, view.layer, bytes(view.blob)) == (key_index, layer, b"")
        assert [bytes(b) for b in view.blobs] == blobs


def test_packed_blobs_parse_as_views_and_fall_back_like_the_rest() -> None:
    data = pb.GetResponse(key_index=3, layer=1, blobs=[b"a" * 10, b"b" * 20]).SerializeToString()
    view = parse_get_response(data)
    assert all(isinstance(b, memoryview) and b.obj is data for b in view.blobs)
    odd = b"\x12\x01\x05" + data  # layer as a packed scalar: protobuf parses it, blobs included
    assert [bytes(b) for b in parse_get_response(odd).blobs] == [b"a" * 10, b"b" * 20]
    assert parse_get_response(pb.GetResponse(layer=1, blob=b"x").SerializeToString()).blobs == []


@pytest.mark.parametrize("ack", [0, pb.ACK_MEMORY, pb.ACK_DURABLE, 77, -3])
@pytest.mark.parametrize("commit", [False, True])
def test_commit_and_ack_fields_match_protobuf(commit: bool, ack: int) -> None:
    for item in ((NS, b"k" * 32, 2, 4, os.urandom(300)), ("", b"", 0, 0, b"")):
        put = pb.PutRequest(
            namespace=item[0],
            key=item[1],
            layer=item[2],
            num_layers=item[3],
            blob=item[4],
            commit=commit,
            ack=ack,
        )
        view = PutRequestView(*item, commit, ack)
        assert encode_put_request(view) == put.SerializeToString()
        parsed = parse_put_request(put.SerializeToString())
        assert _put_fields(parsed) == _put_fields(put)
        assert parsed.has_item == bool(item[1])


def test_commit_flag_read_like_protobuf_from_odd_varints() -> None:
    # A bool is true for any non-zero varint, even one whose low 32 bits are zero.
    for raw in (b"\x30\x02", b"\x30\x80\x80\x80\x80\x10", b"\x30\x00"):
        data = pb.PutRequest(key=b"k" * 32, blob=b"x").SerializeToString() + raw
        assert parse_put_request(data).commit == pb.PutRequest.FromString(data).commit
