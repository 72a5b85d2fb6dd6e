"""SIGINT and SIGTERM while no upload is watching for them.

An upload watches for signals itself while its job runs (``cli._watch_signals``): the first
stops reading, the second stops at once. Before that (Python importing batchlog, the command
line being read, files opened) and after it (the emulator stopped, the summary written), a
signal must still end the command as documented: exit 130, one line, no traceback.

- ``hold()``: a signal is only noted. The command line calls it first, before importing the
  rest of batchlog (a ``KeyboardInterrupt`` there could be caught by nobody), and again once
  the job is over (its outcome stands; nothing is left to interrupt).
- ``arm()``: the next signal raises ``Interrupted`` where the program is, once; one noted
  while held is raised at once.

Signal handlers belong to the process: only the command line uses this module, and it keeps
no imports but the standard library's, so that it is in place before anything else loads.
"""

from __future__ import annotations

import signal

TYPE_CHECKING = False  # no typing import: this module is loaded first, on the clock
if TYPE_CHECKING:
    from types import FrameType
    from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A signal arrived while armed. A BaseException, as KeyboardInterrupt: no ``except
    Exception`` takes it for an error."""

    def __init__(self, signum: int) -> None:
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


class _Guard:
    def __init__(self) -> None:
        self.noted: int | None = None  # the first signal noted while held
        self.armed = False  # raise on the next signal
        self.previous: dict[int, Any] = {}  # handlers found by the first install

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.armed:
            self.armed = False  # once: the way out is not interrupted again
            raise Interrupted(signum)
        if self.noted is None:
            self.noted = signum

    def install(self) -> bool:
        for signum in SIGNALS:
            try:
                old = signal.signal(signum, self.handle)
            except ValueError:  # main() called from another thread (tests): not its signals
                return False
            self.previous.setdefault(signum, old)
        return True


_guard = _Guard()


def hold() -> None:
    """Note a signal, raise nothing."""
    _guard.armed = False
    _guard.install()


def arm() -> None:
    """Raise ``Interrupted`` on the next signal, or now for one noted while held."""
    if not _guard.install():
        return
    noted, _guard.noted = _guard.noted, None
    if noted is not None:
        raise Interrupted(noted)
    _guard.armed = True


def installed() -> bool:
    """Whether ``hold()`` or ``arm()`` put the handlers in place (and ``restore()`` has not)."""
    return bool(_guard.previous)


def restore() -> None:
    """Put back the handlers found before the first ``hold()`` or ``arm()``."""
    _guard.armed = False
    _guard.noted = None
    for signum, old in _guard.previous.items():
        signal.signal(signum, old)  # installed, so this is the main thread
    _guard.previous.clear()


def interrupted_by(exc: BaseException, _seen: frozenset[int] = frozenset()) -> str | None:
    """The signal's name if ``exc`` is an interruption (``Interrupted``, a
    ``KeyboardInterrupt``, or a group of exceptions holding one), else None."""
    if isinstance(exc, Interrupted):
        return exc.name
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT"
    inner = getattr(exc, "exceptions", None)  # an exception group (no builtin before 3.11)
    for each in inner if isinstance(inner, tuple) else ():
        name = interrupted_by(each, _seen) if isinstance(each, BaseException) else None
        if name is not None:
            return name
    # raised inside an import and wrapped by Python ("Error calling __set_name__"): what
    # imports only once a job starts can be interrupted there (found by the state machine)
    cause, seen = exc.__cause__, _seen | {id(exc)}
    return interrupted_by(cause, seen) if cause is not None and id(cause) not in seen else None
