"""KV codec: one (chunk, layer) of K and V <-> one self-describing, checksummed frame.

Public API (one entry per direction, plus the same entry at size one)::

    blobs = encode([(k0, v0), (k1, v1), ...], profile, token_offset=0, context_end=None)  # one chunk
    k, v = decode_into(blobs_of_one_layer)                       # allocated: [heads, all tokens, dim]
    decode_into(blobs_of_one_layer, (k_out, v_out), token_offset=t)  # into the caller's tensors
    blob = encode_layer(k, v, profile, ...)                      # encode([(k, v)], ...)[0]
    k, v = decode_layer(blob, device="cpu", dtype=None)          # decode_into([blob], ...)
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
from transfer.codec.frame import LayerKV, decode_layer, read_header
from transfer.codec.parallel import codec_threads, decode_into, encode, encode_layer, imap_ordered
from transfer.codec.profiles import PROFILES, Profile

__all__ = [
    "FORMAT_VERSION",
    "PROFILES",
    "CodecError",
    "CorruptFrame",
    "FrameHeader",
    "LayerKV",
    "Profile",
    "ShapeMismatch",
    "TruncatedFrame",
    "UnknownProfile",
    "UnknownVersion",
    "codec_threads",
    "decode_into",
    "decode_layer",
    "encode",
    "encode_layer",
    "imap_ordered",
    "read_header",
]
