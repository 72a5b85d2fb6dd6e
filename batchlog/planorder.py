"""The order rules of a migration plan, in one place: the upload's producer, ``validate``
and ``upload --dry-run`` feed it the same lines and reject the same ones, with the same
``FILE:LINE: field: reason`` (found by review: validate and the dry run accepted lines
the upload rejected).

A run's create-run comes before its other lines; a parent's create-run before its
children's. A run the checkpoint maps (its create-run done by an earlier run of the job)
counts as declared. A run given again (a plan concatenated twice, a nightly sync appending
a run exported again when it ended) may repeat its create-run: the repeat is sent as
nothing, it stands for the first (the run's other lines are read back, batchlog.replay);
a second create-run that differs from the first is refused. A create-run of a run an
earlier run of the job made (the checkpoint maps it: its line is not read again) is sent:
the run is looked up by its tag, found, and renamed if its name changed.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from batchlog.records import Record, Rejection

NO_CREATE_RUN = "no create-run for this run earlier in the plan (a run's create-run first)"
SECOND_CREATE_RUN = (
    "a second create-run for this run in the plan, different from the first (same "
    "experiment, run_name, start_time, user and parent, or none)"
)
NO_PARENT = "no create-run for the parent run earlier in the plan (parents first)"


class PlanOrder:
    """Fed every valid record of a job in order; says which break the plan's order."""

    def __init__(self, mapped: Iterable[str] = ()) -> None:
        # source runs with a create-run seen -> the hash of its fields (None: done by an
        # earlier run of the job, not read again)
        self._declared: dict[str, int | None] = dict.fromkeys(mapped)
        self.repeats: set[int] = set()  # seqs of create-runs that repeat an earlier one
        self.again: set[int] = set()  # seqs of create-runs of runs an earlier run made

    def check(self, record: Record, done: bool = False) -> Record | Rejection:
        """``record``, or its Rejection when it breaks the order. A line an earlier run of
        the job finished (``done``) is taken as it was: it is never rejected now."""
        if not record.source_run:  # a hand-written line naming a target run
            return record
        source = record.run_id
        problem: tuple[str, str] | None = None
        if record.op == "create-run":
            parent = (record.fields or {}).get("parent_source_run_id")
            fields = _fingerprint(record)
            if done:
                pass
            elif source in self._declared:
                first = self._declared[source]
                if first is None:  # made by an earlier run of the job: looked up again
                    self.again.add(record.seq)  # (by its tag: a run renamed is renamed)
                    self._declared[source] = fields
                elif first != fields:
                    problem = ("source_run_id", SECOND_CREATE_RUN)
                else:
                    self.repeats.add(record.seq)
            elif parent and str(parent) not in self._declared:
                problem = ("parent_source_run_id", NO_PARENT)
            if problem is None:
                self._declared.setdefault(source, fields)
        elif source not in self._declared and not done:
            problem = ("source_run_id", NO_CREATE_RUN)
        if problem is None:
            return record
        return Rejection(record.seq, record.source, record.raw, *problem)


def _fingerprint(record: Record) -> int:
    """What a repeated create-run must equal (hashes are compared within one process)."""
    return hash(orjson.dumps(record.fields or {}, option=orjson.OPT_SORT_KEYS))
