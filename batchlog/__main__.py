"""`python -m batchlog`, and the `batchlog` command (pyproject's entry point).

The signal handling comes first: importing the rest takes about 0.2 s, and a Ctrl-C in that
time must end the command with exit 130 and one line, not a traceback (batchlog.interrupts).
"""

from __future__ import annotations

import sys

from batchlog import interrupts


def entrypoint() -> None:
    interrupts.hold()  # a signal while the rest loads is answered by main(), once loaded
    from batchlog.cli import main

    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
