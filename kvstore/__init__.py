"""kvstore: a tiered, checksummed store for LLM KV-cache blocks, served over gRPC.

The server side (this package) never imports torch: it moves checksummed bytes.
"""

from __future__ import annotations

__version__ = "0.1.0"
