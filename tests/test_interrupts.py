"""What counts as an interruption when the command line catches an exception."""

from __future__ import annotations

import signal

from batchlog.interrupts import Interrupted, interrupted_by


def test_a_signal_raised_inside_an_import_wrapped_by_python_is_still_an_interruption() -> None:
    """Found by the state machine (SIGTERM 0.2 s after start, aiohttp now imported once the
    job starts): Python wrapped the Interrupted raised in a class body's __set_name__ in
    "RuntimeError: Error calling __set_name__", and the command said "internal error", exit
    3, instead of exit 130."""
    try:
        try:
            raise Interrupted(signal.SIGTERM)
        except Interrupted as exc:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from exc
    except RuntimeError as wrapped:
        assert interrupted_by(wrapped) == "SIGTERM"
    assert interrupted_by(RuntimeError("a bug")) is None
    assert interrupted_by(KeyboardInterrupt()) == "SIGINT"
