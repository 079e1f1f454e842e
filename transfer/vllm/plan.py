"""What the scheduler side tells the workers each step: loads and saves, by block id.

Plain data, no vLLM: the worker side runs without vLLM in the GPU check and in unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.keys import ChunkKey


@dataclass
class LoadSpec:
    """Load the stored chunks ``keys`` of one request into ``block_ids`` (``chunk_blocks`` per key);
    blocks before ``first_block`` were computed locally and are left alone."""

    req_id: str
    keys: list[ChunkKey]
    block_ids: list[int]
    first_block: int

    @property
    def target_blocks(self) -> list[int]:
        return self.block_ids[self.first_block :]


@dataclass
class SaveSpec:
    """Save chunks ``first_chunk ..`` of one request (``keys``) from ``block_ids``."""

    req_id: str
    keys: list[ChunkKey]
    block_ids: list[int]
    first_chunk: int
