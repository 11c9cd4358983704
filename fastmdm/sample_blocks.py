"""Streaming and sharded sampling: rows in fixed-size blocks, each with a seed of its own.

Row block b holds rows [b * block_rows, (b + 1) * block_rows) and draws all of its
randomness (reveal orders, Gumbel noise, values within numeric bins) from a generator
seeded by (seed, b) alone. So the rows depend on the seed and the block size, never on
how the blocks are split among processes: shard k of n takes the k-th of n contiguous runs
of blocks, the shards concatenated in order are the rows of a single-process run, and any
shard can be regenerated alone. Memory is one block at a time, whatever the row count.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["BlockPlan", "shard_path", "parse_shard", "shard_from_environment"]


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class BlockPlan:
    """The blocks of rows one shard generates, and their seeds."""
    num_rows: int
    block_rows: int
    seed: int
    shard: int = 0
    num_shards: int = 1

    def __post_init__(self):
        _check_count("num_rows", self.num_rows)
        _check_count("batch_size", self.block_rows)
        _check_count("num_shards", self.num_shards)
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"shard must lie in 0..{self.num_shards - 1}, got {self.shard}")

    @property
    def blocks(self) -> range:
        total = -(-self.num_rows // self.block_rows)
        return range(self.shard * total // self.num_shards, (self.shard + 1) * total // self.num_shards)

    def rows_of(self, block: int) -> range:
        return range(block * self.block_rows, min((block + 1) * self.block_rows, self.num_rows))

    @property
    def rows(self) -> range:
        """The rows of this shard (global row numbers)."""
        blocks = self.blocks
        return range(min(blocks.start * self.block_rows, self.num_rows),
                      min(blocks.stop * self.block_rows, self.num_rows))

    def generator(self, block: int) -> torch.Generator:
        """A CPU generator for block `block`, seeded from (seed, block) through numpy's SeedSequence."""
        state = np.random.SeedSequence([self.seed, block]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def fresh_seed() -> int:
    """A seed from the operating system's entropy, for sampling without a given seed."""
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0])


def shard_path(path: str | os.PathLike, shard: int, num_shards: int) -> Path:
    """out.parquet -> out-00002-of-00004.parquet (a single shard keeps the name)."""
    path = Path(path)
    if num_shards == 1:
        return path
    return path.with_name(f"{path.stem}-{shard:05d}-of-{num_shards:05d}{path.suffix}")


def parse_shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise ValueError(f"a shard is written K/N (e.g. 2/4), got {text!r}")
    shard, num_shards = int(match[1]), int(match[2])
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard K/N needs 0 <= K < N, got {text!r}")
    return shard, num_shards


def shard_from_environment() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) when not launched by torchrun.
    Sampling shards need no communication, so no process group is started."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
