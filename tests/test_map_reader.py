"""MapReader: every entry of a BPF hash map, read in batches through buffers allocated once; PercpuWords:
which CPUs hold a non-zero value in a range of a per-CPU array."""

from __future__ import annotations

import ctypes

import pytest

from flowmon_agent.kernel.loader import MapReader, PercpuWords

MAPS = """
struct big { u64 words[77]; };  /* as large as a flow value */
BPF_HASH(small, u32, u64, 4096);
BPF_TABLE("lru_hash", u32, struct big, large, 2048);
BPF_PERCPU_ARRAY(words, u64, 24);
"""
pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def maps():
    from bcc import BPF

    bpf = BPF(text=MAPS.encode())
    yield bpf
    bpf.cleanup()


def fill(table, n: int, value) -> dict[bytes, bytes]:
    table.clear()
    for i in range(n):
        table[table.Key(i)] = value(i)
    return {bytes(k): bytes(v) for k, v in table.items()}


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 4096])
def test_every_entry_once_across_chunk_boundaries(maps, n: int) -> None:
    table = maps[b"small"]
    expected = fill(table, n, lambda i: ctypes.c_uint64(i * 1_000_003))
    reader = MapReader(table, chunk=8)
    for _ in range(2):  # the buffers are reused
        got = reader.items()
        assert len(got) == n
        assert dict(got) == expected


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


def test_a_chunk_smaller_than_a_bucket_grows(maps) -> None:
    """A hash bucket with more entries than the buffer holds answers ENOSPC: the buffer doubles."""
    table = maps[b"small"]
    expected = fill(table, 3000, lambda i: ctypes.c_uint64(i))
    reader = MapReader(table, chunk=1)
    assert dict(reader.items()) == expected
    assert reader.chunk > 1  # 3,000 keys in 4,096 buckets: some bucket holds two


def test_percpu_words_name_the_cpus_with_a_value_in_the_range_only(maps) -> None:
    table = maps[b"words"]
    ncpus = table.total_cpu
    reader = PercpuWords(table, first=16, count=4)
    table.clear()
    assert reader.cpus_with_any() == []
    table[table.Key(3)] = table.Leaf(*([1] * ncpus))  # before the range: not seen
    table[table.Key(20)] = table.Leaf(*([7] * ncpus))  # after it: not seen
    assert reader.cpus_with_any() == []
    last = ncpus - 1
    table[table.Key(19)] = table.Leaf(*[1 << 63 if cpu == last else 0 for cpu in range(ncpus)])
    assert reader.cpus_with_any() == [last]
    table[table.Key(16)] = table.Leaf(*[1 if cpu == 0 else 0 for cpu in range(ncpus)])
    assert reader.cpus_with_any() == sorted({0, last})
    assert PercpuWords(table, first=0, count=24).cpus_with_any() == list(range(ncpus))
