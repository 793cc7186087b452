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

import base64
from typing import Sequence

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

try:  # pyarrow's own reader class, wrapped by pq.ParquetFile
    from pyarrow._parquet import ParquetReader as _LowReader
except ImportError:  # pragma: no cover - depends on the installed pyarrow
    _LowReader = None

ARROW_SCHEMA_KEY = b"ARROW:schema"


class SmallParquet:
    """Footer, schema and column reads of one in-memory Parquet file.

    ``read_dictionary``: columns (by index) decoded as dictionaries of their
    values rather than one value per row (the reader's own option). The Arrow
    schema that reader reports for them is then a dictionary type whatever
    type the file stores, so the schema checks use ``stored_schema`` and
    ``plain_schema``, never that reader's own.
    """

    __slots__ = ("_r", "_data", "plain", "metadata", "kv")

    def __init__(self, data: bytes, read_dictionary: Sequence[int] | None = None) -> None:
        if _LowReader is not None:
            r = _LowReader()
            r.open(pa.BufferReader(data), pre_buffer=False, read_dictionary=read_dictionary)
        else:
            r = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False, read_dictionary=read_dictionary).reader
        self._r = r
        self._data = data
        self.plain = not read_dictionary  # no column read as a dictionary: the reader's schema is the file's
        self.metadata: pq.FileMetaData = r.metadata
        self.kv: dict[bytes, bytes] = self.metadata.metadata or {}  # the file's key-value metadata

    def stored_schema(self, expected: pa.Schema) -> pa.Schema | None:
        """The Arrow schema the writer stored in the file (ARROW:schema),
        metadata included, when its fields are ``expected``'s (names, types,
        order); None otherwise or when there is none.

        Not by itself the schema a reader derives (that also depends on the
        Parquet schema: see validate._arrow_schema); parsing it costs less
        than deriving, and holds whatever ``read_dictionary`` says.
        """
        stored = self.kv.get(ARROW_SCHEMA_KEY)
        if stored is None:
            return None
        try:
            schema = ipc.read_schema(pa.py_buffer(base64.b64decode(stored)))
        except Exception:  # noqa: BLE001 - a damaged stored schema: the derivation judges the file
            return None
        return schema if schema.equals(expected, check_metadata=False) else None

    def plain_schema(self) -> pa.Schema:
        """The Arrow schema a reader without ``read_dictionary`` reports (what
        every check compares); with ``read_dictionary``, derived on a second
        reader that reuses the parsed footer."""
        if self.plain:
            return self._r.schema_arrow
        if _LowReader is None:  # pragma: no cover - depends on the installed pyarrow
            return pq.ParquetFile(pa.BufferReader(self._data), metadata=self.metadata).schema_arrow
        r = _LowReader()
        r.open(pa.BufferReader(self._data), pre_buffer=False, metadata=self.metadata)
        return r.schema_arrow

    def read(self, column_indices: Sequence[int] | None = None) -> pa.Table:
        idx = list(range(self.metadata.num_columns)) if column_indices is None else list(column_indices)
        return self._r.read_all(column_indices=idx, use_threads=False)
