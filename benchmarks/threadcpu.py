"""Run `python -m batchlog ARGS` in this process and write each thread's CPU to a JSON file.

    python benchmarks/threadcpu.py OUT.json upload ...

A sampler thread reads /proc/self/task/*/stat every 20 ms (user + system ticks per thread,
named from threading.enumerate()) and once more at the end, so a thread that ends early is
still counted up to its last sample. The sampler's own thread is left out of the figures.
"""

from __future__ import annotations

import os
import runpy
import sys
import threading
import time
from typing import Any

import orjson

TICK = os.sysconf("SC_CLK_TCK")
seen: dict[int, dict[str, Any]] = {}  # tid -> {"name", "cpu_s"}
lock = threading.Lock()


def sample() -> None:
    names = {t.native_id: t.name for t in threading.enumerate()}
    for entry in os.listdir("/proc/self/task"):
        tid = int(entry)
        try:
            with open(f"/proc/self/task/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        with lock:
            old = seen.get(tid, {"name": "?", "cpu_s": 0.0})
            name = names.get(tid, old["name"])
            seen[tid] = {"name": name, "cpu_s": max(cpu, old["cpu_s"])}


def sampler() -> None:
    while True:
        sample()
        time.sleep(0.02)


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["batchlog", *sys.argv[2:]]
    me = threading.Thread(target=sampler, daemon=True, name="bench-sampler")
    me.start()
    code = 0
    try:
        runpy.run_module("batchlog", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sample()
        with lock:
            rows = [v for tid, v in seen.items() if tid != me.native_id]
        with open(out, "wb") as f:
            f.write(orjson.dumps(rows))
    sys.exit(code)


if __name__ == "__main__":
    main()
