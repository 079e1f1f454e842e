"""KV codec: one (chunk, layer) of K and V <-> one self-describing, checksummed frame.

Public API::

    blob = encode_layer(k, v, profile="balanced", saliency=None, token_offset=0, context_end=None)
    blobs = encode_layers([(k0, v0), (k1, v1), ...], profile, ...)   # one chunk, all layers, same bytes
    k, v = decode_layer(blob, device="cpu", dtype=None)
    header = read_header(blob)

Profiles (``PROFILES``): ``lossless`` (bit-exact), ``int8``, ``balanced``, ``dense``.
Errors: ``CodecError`` and its subclasses. The codec never does I/O. See docs/codec.md.
"""

from __future__ import annotations

from transfer.codec.errors import (
    CodecError,
    CorruptFrame,
    ShapeMismatch,
    TruncatedFrame,
    UnknownProfile,
    UnknownVersion,
)
from transfer.codec.format import FORMAT_VERSION, FrameHeader
from transfer.codec.frame import decode_layer, encode_layer, encode_layers, read_header
from transfer.codec.parallel import codec_threads, decode_concat, decode_many, encode_chunk, imap_ordered
from transfer.codec.profiles import PROFILES, Profile

__all__ = [
    "FORMAT_VERSION",
    "PROFILES",
    "CodecError",
    "CorruptFrame",
    "FrameHeader",
    "Profile",
    "ShapeMismatch",
    "TruncatedFrame",
    "UnknownProfile",
    "UnknownVersion",
    "codec_threads",
    "decode_layer",
    "decode_concat",
    "decode_many",
    "encode_chunk",
    "encode_layer",
    "encode_layers",
    "imap_ordered",
    "read_header",
]
