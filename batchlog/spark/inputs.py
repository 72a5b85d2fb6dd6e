"""A DataFrame in, each bucket's lines out: in their order, with their sources.

Two kinds of DataFrame, told apart by name: a string column of manifest lines (``value``,
as ``spark.read.text`` gives it, or the column named by ``lines``) and no manifest field,
its other columns (partition columns, say) left out; else the manifest's fields as
columns. Either may have ``order_by`` columns besides, which order the rows and are left
out of the line unless they are manifest fields. Each row becomes one manifest line, with
its source, an order key and the bucket of its run. The source is ``FILE:LINE`` only for
a bare read of text files (``spark.read.text(...)``, at most its columns selected): after
a filter, a sample or a shuffle Spark's row positions are no longer the file's lines, so
a line gets a key, ``FILE row KEY`` (``row KEY`` if Spark no longer knows the file; a
table's rows always). Nothing but a few figures per input file reaches the driver.
"""

from __future__ import annotations

import bisect
import functools
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

from batchlog.planfields import CREATE_RUN_FIELDS, LOG_BATCH_FIELDS, UPDATE_RUN_FIELDS
from batchlog.validate import RECORD_FIELDS

if TYPE_CHECKING:
    from pyspark import RDD
    from pyspark.sql import Column, DataFrame

LINE = "__batchlog_line"
SOURCE = "__batchlog_source"
ID = "__batchlog_id"
FILE = "__batchlog_file"
BLOCK = "__batchlog_block"  # the byte offset in its file of the split a line was read from
BUCKET = "__batchlog_bucket"
ROOT = "__batchlog_root"
PARTITION_BITS = 33  # monotonically_increasing_id: partition index << 33 | row index
MAX_ROUNDS = 40  # of pointer doubling: a parent chain of 2**40 runs is never reached
JSON_FIELDS = ("dataset_inputs", "datasets", "params", "metrics", "tags")  # JSON if a string
MANIFEST_FIELDS = frozenset(
    (*RECORD_FIELDS, *CREATE_RUN_FIELDS, *LOG_BATCH_FIELDS, *UPDATE_RUN_FIELDS, "source_run_id")
)
PARENT = "parent_source_run_id"

Bucketed = tuple[int, str, str]  # (bucket, line, source)
SEED = 42  # of Spark's Murmur3Hash, which HashPartitioning uses
_M32 = 0xFFFFFFFF
_FILE_URL = re.compile("^file:(//)?")


def bucketed(
    df: DataFrame, buckets: int, order_by: Sequence[str] | None, lines_column: str = "value"
) -> RDD[Bucketed]:
    """The rows of ``df`` as (bucket, line, source), partition N holding bucket N's lines
    sorted by their order key. Spark shuffles and sorts them (spilling to disk as it
    sorts); Python sees each line once, in its bucket's task."""
    from pyspark.sql import functions as F

    lines = as_lines(df, order_by, lines_column)
    keyed = with_buckets(lines.frame, buckets, lines.nested)
    # repartition sends a row to partition pmod(murmur3(key), n): keyed by a number that
    # goes to partition N, bucket N's rows are partition N's (the task checks each row)
    key = F.element_at(F.lit(partition_keys(buckets)), F.col(BUCKET) + 1)
    rows = (
        keyed.repartition(buckets, key)
        .sortWithinPartitions(*[F.asc_nulls_last(name) for name in lines.order])
        .select(BUCKET, LINE, SOURCE, FILE, ID, BLOCK)
        .rdd
    )
    if rows.getNumPartitions() == 0:  # adaptive execution leaves an empty input none
        rows = df.sparkSession.sparkContext.parallelize([], buckets)  # every bucket is run
    return rows.map(lines.sources)


@dataclass(frozen=True)
class Lines:
    frame: DataFrame  # LINE, SOURCE (null: FILE:LINE, by ``sources``), FILE, ID, BLOCK, order
    order: list[str]  # the columns that order a bucket's lines
    nested: bool | None  # may a create-run line name a parent? (None: not looked at)
    sources: Sources


@dataclass(frozen=True)
class Split:
    """Where a split's lines are in their file: the lines of the file's earlier splits,
    how many lines the split has, and the ID of the first line of each copy of the split
    that its partition read (a file listed twice in one read is read twice: each copy is
    numbered as the file's own lines)."""

    shown: str  # the file, as the user wrote its path
    before: int
    lines: int
    copies: list[int]  # the first ID of each run of the split's rows, ascending


@dataclass(frozen=True)
class Sources:
    """(bucket, line, source) of a row (BUCKET, LINE, SOURCE, FILE, ID, BLOCK): a null
    SOURCE is ``FILE:LINE``, the line's number being the lines of its file's earlier
    splits plus its index in its copy of its split; a row key of a line read from a file
    is preceded by the file. Run in the task, on the way in."""

    splits: dict[tuple[str, int, int], Split]  # (file, block start, partition) -> Split

    def __call__(self, row: Any) -> Bucketed:
        bucket, line, source, file, at, block = row
        if source is None:
            split = self.splits[(file, block, at >> PARTITION_BITS)]
            first = split.copies[bisect.bisect_right(split.copies, at) - 1]
            source = f"{split.shown}:{split.before + (at - first) % split.lines + 1}"
        elif file:
            source = f"{path_of(file)} {source}"
        return bucket, line, source


@functools.lru_cache(maxsize=1024)
def path_of(url: str) -> str:
    """input_file_name's URL as the user wrote the path: file:///a/b%20c -> /a/b c."""
    return urllib.parse.unquote(_FILE_URL.sub("", url))


@functools.cache
def partition_keys(buckets: int) -> list[int]:
    """For each partition N of ``buckets``, the least number ``repartition`` sends there
    (about buckets * ln(buckets) tries)."""
    keys: list[int | None] = [None] * buckets
    left, number = buckets, 0
    while left:
        at = _murmur3_int(number) % buckets  # Python's % of a negative: Spark's pmod
        if keys[at] is None:
            keys[at] = number
            left -= 1
        number += 1
    return [k for k in keys if k is not None]


def _murmur3_int(value: int) -> int:
    """Spark's Murmur3Hash of one int column (Murmur3_x86_32.hashInt, seed 42), signed."""

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & _M32

    k1 = rotl((value * 0xCC9E2D51) & _M32, 15) * 0x1B873593 & _M32
    h1 = (rotl(SEED ^ k1, 13) * 5 + 0xE6546B64) & _M32
    h1 ^= 4
    h1 ^= h1 >> 16
    h1 = (h1 * 0x85EBCA6B) & _M32
    h1 ^= h1 >> 13
    h1 = (h1 * 0xC2B2AE35) & _M32
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 & 0x80000000 else h1


def is_text(df: DataFrame, lines: str = "value", order: Sequence[str] = ()) -> bool:
    """Does ``df`` hold manifest lines, in its string column ``lines``? Yes if it has that
    column and no manifest field as a column (``order`` columns aside); else it holds
    fields. Refused, as a mistake: both at once; neither (no row could be sent);
    ordering lines by themselves; a ``lines`` column named (not ``value``) it lacks."""
    from pyspark.sql.types import StringType

    from batchlog.errors import ConfigurationError

    types = {f.name: f.dataType for f in df.schema.fields}
    fields = [c for c in df.columns if c in MANIFEST_FIELDS and c not in order]
    if not isinstance(types.get(lines), StringType):
        if lines != "value":
            raise ConfigurationError(f"lines: no string column {lines!r} in the DataFrame")
        if not MANIFEST_FIELDS.intersection(df.columns):
            raise ConfigurationError(
                "the DataFrame has no string column 'value' of manifest lines and no "
                f"manifest field as a column ({', '.join(df.columns)[:300]}): name its "
                "column of lines with lines=..., or give the fields as columns"
            )
        return False
    if lines in order:
        if fields:
            return False  # a table of fields, ordered by a column named as lines are
        raise ConfigurationError(
            f"order_by {lines!r}: that is the column of manifest lines; order by other "
            "columns, or leave order_by out to keep the files' order"
        )
    if fields:
        raise ConfigurationError(
            f"the DataFrame has a column of manifest lines {lines!r} and manifest fields as "
            f"columns ({', '.join(fields)}): select one or the other"
        )
    return True


def as_lines(df: DataFrame, order_by: Sequence[str] | None, lines: str = "value") -> Lines:
    """``df`` as lines, blank ones left out (as batchlog skips them) after they were
    counted."""
    from pyspark.sql import functions as F

    from batchlog.errors import ConfigurationError

    missing = [name for name in order_by or () if name not in df.columns]
    if missing:
        raise ConfigurationError(f"order_by: no column {missing[0]!r} in the DataFrame")
    order = list(order_by or ())
    if is_text(df, lines, order):
        text = df.select(
            F.col(lines).alias(LINE),
            *[F.col(name) for name in order],
            F.input_file_name().alias(FILE),
            F.monotonically_increasing_id().alias(ID),
            F.input_file_block_start().alias(BLOCK),
        )
        relation = _bare_text_relation(df, lines)
        if relation is not None:
            return _numbered(text, order, _listed_twice(df, relation))
        nested: bool | None = None
        order = order or [FILE]  # a file's lines in their order, as far as Spark keeps it
    else:
        # an order column that is no manifest field orders the rows and is not sent
        kept = [c for c in df.columns if c not in order or c in MANIFEST_FIELDS]
        fields = df.select(*kept)
        line = F.udf(_line_of_row, "string")(F.struct(*[F.col(c) for c in fields.columns]))
        text = df.select(
            line.alias(LINE),
            *order,
            F.lit(None).cast("string").alias(FILE),
            F.monotonically_increasing_id().alias(ID),
            F.lit(-1).cast("long").alias(BLOCK),
        )
        nested = PARENT in fields.columns  # the line's keys are these columns
    text = text.where(F.col(LINE).isNotNull() & (F.trim(F.col(LINE)) != ""))
    return Lines(_row_keyed(text, [*order, ID]), [*order, ID], nested, Sources({}))


def _may_name_a_parent() -> Column:
    """True for a line that may be a create-run naming a parent: one that holds the key's
    name, or any \\u escape (a key may be spelled with them). A cheap test, no JSON read."""
    from pyspark.sql import functions as F

    return F.col(LINE).contains(PARENT) | F.col(LINE).contains("\\u")


def _bare_text_relation(df: DataFrame, lines: str) -> Any:
    """The text files' relation (a JVM object) if ``df`` is Spark's read of text files,
    with at most some of its columns selected (or an alias); else None. Only then are a
    split's rows the file's lines, all and in order. If the plan cannot be read (no JVM
    plan, another Spark): None, and the lines get keys."""
    if lines != "value":  # the text source's own column: any other is renamed or made
        return None
    try:
        plan = df._jdf.queryExecution().analyzed()
        while True:
            kind = plan.getClass().getSimpleName()
            if kind == "SubqueryAlias":
                plan = plan.child()
            elif kind == "Project":
                columns = plan.projectList()
                for at in range(columns.size()):
                    if columns.apply(at).getClass().getSimpleName() != "AttributeReference":
                        return None
                plan = plan.child()
            else:
                break
        if (
            kind == "LogicalRelation"
            and plan.relation().fileFormat().getClass().getSimpleName() == "TextFileFormat"
        ):
            return plan.relation()
        return None
    except Exception:  # a plan of another shape than Spark 3.5's: not known to be bare
        return None


def _listed_twice(df: DataFrame, relation: Any) -> dict[str, int]:
    """How many times the read lists each file it lists more than once (``[a, a]``, or a
    glob and a file it matches): Spark reads such a file that many times. Empty for the
    usual read (two calls to the JVM: the files listed, and the distinct ones); else one
    call per file listed."""
    listed = relation.location().allFiles()
    if listed.size() == len(df._jdf.inputFiles()):  # Dataset.inputFiles: distinct
        return {}
    counts: dict[str, int] = {}
    for at in range(listed.size()):
        path = path_of(listed.apply(at).getPath().toUri().toString())
        counts[path] = counts.get(path, 0) + 1
    return {path: n for path, n in counts.items() if n > 1}


def _numbered(text: DataFrame, order: list[str], listed_twice: dict[str, int]) -> Lines:
    """Lines read from files, in file order, named FILE:LINE as they reach their task. A
    line's number is the lines of its file's earlier splits (by their byte offset, each
    counted once) plus its index in its copy of its split: the driver gets (file, split,
    partition, count, first id), a few rows per file. The same pass tells whether any line
    may name a parent run (``with_buckets`` needs to find roots only then).

    A file the read lists N times (``listed_twice``) is read N times, its copies perhaps
    in one partition: where each copy begins is found for those files only. Lines not read
    from a file (an empty input_file_name) get a row key instead. The ``order`` columns,
    if any, order the lines before file and line."""
    from pyspark.sql import functions as F

    part = F.shiftright(F.col(ID), PARTITION_BITS).alias("part")
    counted = (
        text.groupBy(FILE, BLOCK, part)
        .agg(
            F.count("*").alias("n"),
            F.min(ID).alias("first"),
            F.max(_may_name_a_parent()).alias("nested"),
        )
        .collect()
    )
    lines_of: dict[tuple[str, int], int] = {}  # (file, block) -> lines, every copy's
    for row in counted:
        key = (row[FILE], row[BLOCK])
        lines_of[key] = lines_of.get(key, 0) + row["n"]
    before: dict[tuple[str, int], int] = {}
    seen: dict[str, int] = {}
    for file, block in sorted(lines_of):
        lines_of[(file, block)] = max(
            1, lines_of[(file, block)] // listed_twice.get(path_of(file), 1)
        )
        before[(file, block)] = seen.get(file, 0)
        seen[file] = before[(file, block)] + lines_of[(file, block)]
    twice = sorted(file for file in seen if path_of(file) in listed_twice)
    copies = _copies(text, twice) if twice else {}
    splits = {
        (row[FILE], row[BLOCK], row["part"]): Split(
            path_of(row[FILE]),
            before[(row[FILE], row[BLOCK])],
            lines_of[(row[FILE], row[BLOCK])],
            copies.get((row[FILE], row[BLOCK], row["part"]), [row["first"]]),
        )
        for row in counted
    }
    lines = text.where(F.col(LINE).isNotNull() & (F.trim(F.col(LINE)) != ""))
    if "" in seen:  # not (all) from files: those rows get a row key
        lines = _row_keyed(lines, [*order, FILE, BLOCK, ID], only_unnamed=True)
    else:
        lines = lines.withColumn(SOURCE, F.lit(None).cast("string"))
    nested = any(row["nested"] for row in counted)
    # by file, then split by byte offset: the file's order, whatever order Spark read
    # its splits in (a copy of a split after the other)
    return Lines(lines, [*order, FILE, BLOCK, ID], nested, Sources(splits))


def _copies(text: DataFrame, files: list[str]) -> dict[tuple[str, int, int], list[int]]:
    """(file, block, partition) -> the first ID of each run of consecutive IDs of the
    split's rows, for ``files`` only: a run is one copy of the split, or several read one
    after the other (a run then holds whole copies, each the split's number of lines)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    part = F.shiftright(F.col(ID), PARTITION_BITS).alias("part")
    rows = text.where(F.col(FILE).isin(files)).select(FILE, BLOCK, part, ID)
    previous = F.lag(ID).over(Window.partitionBy(FILE, BLOCK, "part").orderBy(ID))
    starts = (
        rows.withColumn("previous", previous)
        .where(F.col("previous").isNull() | (F.col(ID) - F.col("previous") != 1))
        .collect()
    )
    out: dict[tuple[str, int, int], list[int]] = {}
    for row in starts:
        out.setdefault((row[FILE], row[BLOCK], row["part"]), []).append(row[ID])
    return {key: sorted(ids) for key, ids in out.items()}


def _row_keyed(text: DataFrame, order: list[str], only_unnamed: bool = False) -> DataFrame:
    """``row KEY``: the first 12 hex digits of the line's SHA-256, and ``#N`` for its N-th
    occurrence (N > 1) in its file (if any) in ``order``: the same for the same content.
    ``Sources`` puts the file before it."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    digest = F.substring(F.sha2(F.col(LINE), 256), 1, 12)
    window = Window.partitionBy(FILE, digest).orderBy(*order)
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


def with_buckets(lines: DataFrame, buckets: int, nested: bool | None = None) -> DataFrame:
    """``lines`` with the bucket of each: a stable hash (CRC-32) of its run key mod
    ``buckets``. The run key is the line's ``run_id``; for a migration plan's line (which
    names its run by ``source_run_id``) the root of its run's parent chain, so that a
    nested run goes with its parents, whose create-run must come first in the same job.
    A line that names no run goes by its own text. Roots are looked for unless ``nested``
    says that no line names a parent."""
    from pyspark.sql import functions as F

    def field(name: str) -> Column:
        return F.get_json_object(F.col(LINE), f"$.{name}")

    source_run = field("source_run_id")
    roots = (
        None
        if nested is False
        else _roots(lines.where(field("op") == "create-run"), source_run, field(PARENT))
    )
    if roots is None:  # no nested runs: a run is its own root, no join
        joined = lines.withColumn("__run", source_run).withColumn(ROOT, F.lit(None))
    else:
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


def _roots(creates: DataFrame, run: Column, parent: Column) -> DataFrame | None:
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
        return None
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
