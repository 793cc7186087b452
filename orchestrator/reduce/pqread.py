"""Thin, fast access to small Parquet files already in memory.

A sweep has thousands of files of a few hundred rows each, so the fixed cost per
file matters more than decode speed: ``pq.ParquetFile(...).read()`` spends more
time in Python bookkeeping than in decoding such a file. The low-level reader
that ``ParquetFile`` wraps does the same work at about half the cost; when a
pyarrow version lacks it, the public class is used instead. The bytes are
already in memory, so pre-buffering (coalesced reads through pyarrow's I/O
thread pool, the default) only adds work: about a third of each file's
open + read cost.
"""
from __future__ import annotations

from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

try:  # pyarrow's own reader class, wrapped by pq.ParquetFile
    from pyarrow._parquet import ParquetReader as _LowReader
except ImportError:  # pragma: no cover - depends on the installed pyarrow
    _LowReader = None


class SmallParquet:
    """Footer, schema and column reads of one in-memory Parquet file."""

    __slots__ = ("_r", "metadata", "_schema_arrow")

    def __init__(self, data: bytes, dictionary: Sequence[int] | None = None) -> None:
        """``dictionary``: positions of string columns to decode as dictionary arrays."""
        if _LowReader is not None:
            r = _LowReader()
            r.open(pa.BufferReader(data), pre_buffer=False, read_dictionary=dictionary)
        else:
            r = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False, read_dictionary=dictionary).reader
        self._r = r
        self.metadata: pq.FileMetaData = r.metadata
        self._schema_arrow: pa.Schema | None = None

    @property
    def schema_arrow(self) -> pa.Schema:
        """The Arrow schema the reader decodes to, built on first use: a file
        whose Parquet schema is the expected one never needs it (validate.py)."""
        if self._schema_arrow is None:
            self._schema_arrow = self._r.schema_arrow
        return self._schema_arrow

    def read(self, column_indices: Sequence[int] | None = None) -> pa.Table:
        idx = list(range(len(self.schema_arrow))) if column_indices is None else list(column_indices)
        return self._r.read_all(column_indices=idx, use_threads=False)


# stats_constant's answer when the statistics cannot tell.
UNKNOWN = object()


def stats_constant(md: pq.FileMetaData, col: int) -> object:
    """What column ``col``'s footer statistics say about it holding one value.

    That value, raw (bytes for a string column, int for an integer one), when
    every row group shows the same min == max and no nulls; None when they show
    nulls or more than one value; UNKNOWN when a row group has no min/max or
    null count (or the file has no row group). Raw min/max rather than
    ``min``/``max``: those convert through the logical type, which costs more
    than the rest of the check. Float statistics skip NaN, so for a float
    column min == max does not prove it constant: callers ask only of string
    and integer columns."""
    value: object = UNKNOWN
    for rg in range(md.num_row_groups):
        st = md.row_group(rg).column(col).statistics
        if st is None or not st.has_min_max or st.null_count is None:
            return UNKNOWN
        lo = st.min_raw
        if st.null_count or lo != st.max_raw or (value is not UNKNOWN and lo != value):
            return None
        value = lo
    return value

