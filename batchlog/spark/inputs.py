"""A DataFrame in, each bucket's lines out: in their order, with their sources.

Two kinds of DataFrame: one string column of manifest lines (``spark.read.text`` gives
``value``), or the manifest's fields as columns. Each row becomes one manifest line, with
its source (``FILE:LINE`` where Spark read it from a file, else ``row KEY``), an order key
and the bucket of its run. Nothing but a few figures per input file reaches the driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from pyspark import RDD
    from pyspark.sql import Column, DataFrame

LINE = "__batchlog_line"
SOURCE = "__batchlog_source"
ID = "__batchlog_id"
FILE = "__batchlog_file"
NUMBER = "__batchlog_number"
BUCKET = "__batchlog_bucket"
ROOT = "__batchlog_root"
PARTITION_BITS = 33  # monotonically_increasing_id: partition index << 33 | row index
MAX_ROUNDS = 40  # of pointer doubling: a parent chain of 2**40 runs is never reached
JSON_FIELDS = ("dataset_inputs", "datasets", "params", "metrics", "tags")  # JSON if a string

Keyed = tuple[tuple[int, tuple[Any, ...]], tuple[str, str]]


def bucketed(df: DataFrame, buckets: int, order_by: Sequence[str] | None) -> RDD[Keyed]:
    """The rows of ``df`` as ((bucket, order key), (line, source)), partition N holding
    bucket N's lines sorted by their order key (spilled to disk as Spark sorts)."""
    lines, order = as_lines(df, order_by)
    keyed = with_buckets(lines, buckets)
    rdd = keyed.select(BUCKET, *order, LINE, SOURCE).rdd.map(_keyed)
    # the key is a tuple, which pyspark's stubs do not count as ordered
    return rdd.repartitionAndSortWithinPartitions(  # type: ignore[type-var]
        buckets, partitionFunc=_bucket_of, ascending=True, keyfunc=_same
    )


def _keyed(row: Any) -> Keyed:
    # (is null, value): None sorts first and is never compared with a value
    order = tuple((value is None, value) for value in row[1:-2])
    return (row[0], order), (row[-2], row[-1])


def _bucket_of(key: tuple[int, tuple[Any, ...]]) -> int:
    return key[0]


def _same(key: tuple[int, tuple[Any, ...]]) -> tuple[int, tuple[Any, ...]]:
    return key


def is_text(df: DataFrame) -> bool:
    from pyspark.sql.types import StringType

    fields = df.schema.fields
    return len(fields) == 1 and isinstance(fields[0].dataType, StringType)


def as_lines(df: DataFrame, order_by: Sequence[str] | None) -> tuple[DataFrame, list[str]]:
    """``df`` as (LINE, SOURCE, order columns...) and the names of the order columns;
    blank lines left out (as batchlog skips them), after they were counted."""
    from pyspark.sql import functions as F

    from batchlog.errors import ConfigurationError

    missing = [name for name in order_by or () if name not in df.columns]
    if missing:
        raise ConfigurationError(f"order_by: no column {missing[0]!r} in the DataFrame")
    order = list(order_by or ())
    if is_text(df):
        text = df.select(
            F.col(df.columns[0]).alias(LINE),
            *[F.col(name) for name in order if name != df.columns[0]],
            F.input_file_name().alias(FILE),
            F.monotonically_increasing_id().alias(ID),
        )
        if not order:
            return _numbered(text)
    else:
        line = F.udf(_line_of_row, "string")(F.struct(*[F.col(c) for c in df.columns]))
        text = df.select(line.alias(LINE), *order, F.monotonically_increasing_id().alias(ID))
    text = text.where(F.col(LINE).isNotNull() & (F.trim(F.col(LINE)) != ""))
    return _row_keyed(text, [*order, ID]), [*order, ID]


def _numbered(text: DataFrame) -> tuple[DataFrame, list[str]]:
    """Lines read from files, with their FILE:LINE. A line's number is the lines of its file
    in earlier partitions plus its index in its own: the driver gets (file, partition,
    count, first id) per split, a few rows per file.

    This relies on FileScan giving a file's splits in file order: Spark sorts the splits by
    size, descending and stably, and all but a file's last split have the same size, which
    keeps them in order, the last one after them. Lines not read from a file (an empty
    input_file_name) get a row key instead."""
    from pyspark.sql import functions as F

    part = F.shiftright(F.col(ID), PARTITION_BITS).alias("part")
    splits = (
        text.groupBy(FILE, part).agg(F.count("*").alias("n"), F.min(ID).alias("first")).collect()
    )
    offsets: list[tuple[str, int, int, int]] = []
    seen: dict[str, int] = {}
    for row in sorted(splits, key=lambda r: (r[FILE], r["part"])):
        before = seen.get(row[FILE], 0)
        offsets.append((row[FILE], row["part"], before, row["first"]))
        seen[row[FILE]] = before + row["n"]
    session = text.sparkSession
    table = session.createDataFrame(offsets, f"{FILE} string, part long, offset long, first long")
    numbered = (
        text.withColumn("part", F.shiftright(F.col(ID), PARTITION_BITS))
        .join(F.broadcast(table), [FILE, "part"])
        .withColumn(NUMBER, F.col("offset") + F.col(ID) - F.col("first") + 1)
        .where(F.col(LINE).isNotNull() & (F.trim(F.col(LINE)) != ""))
    )
    if "" in seen:  # not (all) from files: those rows get a row key
        numbered = _row_keyed(numbered, [ID], only_unnamed=True)
        source = F.when(F.col(FILE) != "", _file_line()).otherwise(F.col(SOURCE))
    else:
        source = _file_line()
    return numbered.withColumn(SOURCE, source), [FILE, NUMBER]


def _file_line() -> Column:
    from pyspark.sql import functions as F

    shown = F.regexp_replace(F.col(FILE), "^file:(//)?", "")  # file:///x -> /x
    return F.concat(shown, F.lit(":"), F.col(NUMBER).cast("string"))


def _row_keyed(text: DataFrame, order: list[str], only_unnamed: bool = False) -> DataFrame:
    """``row KEY``: the first 12 hex digits of the line's SHA-256, and ``#N`` for its N-th
    occurrence (N > 1) in ``order``: the same for the same table content."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    digest = F.substring(F.sha2(F.col(LINE), 256), 1, 12)
    window = Window.partitionBy(digest).orderBy(*order)
    nth = F.row_number().over(window)
    key = F.concat(
        F.lit("row "), digest, F.when(nth > 1, F.concat(F.lit("#"), nth)).otherwise(F.lit(""))
    )
    if only_unnamed:
        return text.withColumn(SOURCE, F.when(F.col(FILE) == "", key))
    return text.withColumn(SOURCE, key)


def _line_of_row(row: Any) -> str:
    """One row of manifest fields as a JSON line: null columns left out; a string column
    of datasets, params, metrics or tags holding JSON taken as that JSON (model_json given
    as a string stays a string, as the manifest format allows)."""
    doc: dict[str, Any] = {}
    for name, value in row.asDict(recursive=True).items():
        if value is None:
            continue
        if name in JSON_FIELDS and isinstance(value, str):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                pass  # kept as the string: rejected, named, by the validator
        doc[name] = value
    return orjson.dumps(doc, default=_json_default).decode()


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    raise TypeError(f"a {type(value).__name__} value has no JSON form")


def with_buckets(lines: DataFrame, buckets: int) -> DataFrame:
    """``lines`` with the bucket of each: a stable hash (CRC-32) of its run key mod
    ``buckets``. The run key is the line's ``run_id``; for a migration plan's line (which
    names its run by ``source_run_id``) the root of its run's parent chain, so that a
    nested run goes with its parents, whose create-run must come first in the same job.
    A line that names no run goes by its own text."""
    from pyspark.sql import functions as F

    def field(name: str) -> Column:
        return F.get_json_object(F.col(LINE), f"$.{name}")

    source_run = field("source_run_id")
    roots = _roots(
        lines.where(field("op") == "create-run"), source_run, field("parent_source_run_id")
    )
    joined = lines.withColumn("__run", source_run).join(
        roots, F.col("__run") == F.col("node"), "left"
    )
    key = F.coalesce(
        F.when(F.col("__run").isNotNull(), F.coalesce(F.col(ROOT), F.col("__run"))),
        field("run_id"),
        F.col(LINE),
    )
    bucket = F.pmod(F.crc32(key.cast("binary")), F.lit(buckets)).cast("int")
    return joined.withColumn(BUCKET, bucket)


def _roots(creates: DataFrame, run: Column, parent: Column) -> DataFrame:
    """(node, ROOT): each plan run that has a parent, and the root of its parent chain, by
    pointer doubling: a few distributed self-joins (log2 of the deepest chain). A run in a
    loop (or below one) is its own root: its create-run then comes before its parent's in
    its bucket, and batchlog rejects it, naming the parent (a loop has no first run)."""
    from pyspark.sql import functions as F

    pointers = (
        creates.select(run.alias("node"), parent.alias("ptr"))
        .where(F.col("node").isNotNull() & F.col("ptr").isNotNull())
        .groupBy("node")
        .agg(F.min("ptr").alias("ptr"))  # two different parents: one, the same each time
        .localCheckpoint()  # one pass over the input; the rounds read this
    )
    if pointers.isEmpty():  # no nested runs: nothing to join
        return pointers.select("node", F.col("ptr").alias(ROOT))
    moved_before = -1
    step = pointers.withColumn("moved", F.lit(True))
    for _ in range(MAX_ROUNDS):
        a, b = step.alias("a"), step.alias("b")
        step = (
            a.join(b, F.col("a.ptr") == F.col("b.node"), "left")
            .select(
                F.col("a.node").alias("node"),
                F.coalesce(F.col("b.ptr"), F.col("a.ptr")).alias("ptr"),
                F.col("b.node").isNotNull().alias("moved"),
            )
            .localCheckpoint()  # each round reads the last, not the whole lineage again
        )
        moved = step.where("moved").count()
        # in a forest, fewer move every round until none does; the same number twice:
        # those left move round a loop for ever
        if moved in (0, moved_before):
            break
        moved_before = moved
    return step.select(
        "node", F.when(F.col("moved"), F.col("node")).otherwise(F.col("ptr")).alias(ROOT)
    )
