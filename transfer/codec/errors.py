"""Typed codec errors: every way a frame can be refused, each naming the problem.

Callers catch ``CodecError`` to treat any bad frame as a miss; the subclasses say
why, so a metric or a log line can tell bit rot from a version skew.
"""

from __future__ import annotations


class CodecError(Exception):
    """Root of every error the codec raises."""


class UnknownVersion(CodecError):
    """The frame was written by a format version this decoder does not know."""


class UnknownProfile(CodecError):
    """The profile name (encode) or id (decode) is not one this codec knows."""


class TruncatedFrame(CodecError):
    """The frame is shorter than its header says it must be."""


class CorruptFrame(CodecError):
    """The integrity trailer does not match, or the content contradicts itself."""


class ShapeMismatch(CodecError):
    """K and V (or a saliency map) have shapes or dtypes the codec cannot encode."""
