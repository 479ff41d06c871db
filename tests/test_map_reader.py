"""MapReader: every entry of a BPF hash map, read in batches through buffers allocated once."""

from __future__ import annotations

import ctypes

import pytest

from flowmon_agent.bpf_loader import MapReader

MAPS = """
struct big { u64 words[77]; };  /* as large as a flow value */
BPF_HASH(small, u32, u64, 4096);
BPF_TABLE("lru_hash", u32, struct big, large, 2048);
"""


@pytest.fixture(scope="module")
def maps(require_root):
    from bcc import BPF

    bpf = BPF(text=MAPS.encode())
    yield bpf
    bpf.cleanup()


def fill(table, n: int, value) -> dict[bytes, bytes]:
    table.clear()
    for i in range(n):
        table[table.Key(i)] = value(i)
    return {bytes(k): bytes(v) for k, v in table.items()}


@pytest.mark.bpf
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 4096])
def test_every_entry_once_across_chunk_boundaries(maps, n: int) -> None:
    table = maps[b"small"]
    expected = fill(table, n, lambda i: ctypes.c_uint64(i * 1_000_003))
    reader = MapReader(table, chunk=8)
    for _ in range(2):  # the buffers are reused
        got = reader.items()
        assert len(got) == n
        assert dict(got) == expected


@pytest.mark.bpf
def test_large_values_are_copied_whole(maps) -> None:
    table = maps[b"large"]

    def value(i: int):
        v = table.Leaf()
        v.words[0], v.words[76] = i, ~i & 0xFFFFFFFFFFFFFFFF
        return v

    expected = fill(table, 1500, value)
    got = MapReader(table, chunk=64).items()
    assert len(got) == 1500 and dict(got) == expected
    assert all(len(v) == 77 * 8 for _, v in got)


@pytest.mark.bpf
def test_a_chunk_smaller_than_a_bucket_grows(maps) -> None:
    """A hash bucket with more entries than the buffer holds answers ENOSPC: the buffer doubles."""
    table = maps[b"small"]
    expected = fill(table, 3000, lambda i: ctypes.c_uint64(i))
    reader = MapReader(table, chunk=1)
    assert dict(reader.items()) == expected
    assert reader._chunk > 1  # 3,000 keys in 4,096 buckets: some bucket holds two
