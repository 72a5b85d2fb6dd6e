"""Where `batchlog upload`'s CPU goes, per request, by thread and by area.

    python benchmarks/hotpath.py [--requests 3000] [--rate 500] [--cprofile] [--out FILE]

`batchlog upload` (default flags, --concurrency 64) sends one-record requests to the
emulator (5 ms latency), the server on core 0 and the client on the others (taskset, when
there are 2 cores or more). Three measurements:

1. CPU per thread, measured: the upload runs under benchmarks/threadcpu.py, which reads
   /proc/self/task/*/stat; once on one record (start-up) and once on all, the difference
   divided by the extra requests.
2. Where each thread's CPU goes: py-spy samples every thread with native frames (py-spy
   must be installed: `pip install py-spy`). Its idle detection does not work on this
   machine's kernel, so samples waiting (for the GIL, a lock, a queue, epoll: seen in the
   native frames) are dropped here, as are start-up's (imports, credentials) and the exit's;
   each thread's remaining samples are put in an area (the nearest specific frame from the
   innermost out) and scaled to that thread's measured CPU. py-spy pauses the process for
   every sample: the upload runs slower under it, the proportions are what counts.
3. --cprofile: call counts per request (cProfile: the main thread only, and slowed down).
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import orjson
from procs import UNPINNED, Placement, pinned_placement, run_measured
from run import HERE, PY, EmulatorProcess, Workdir, batchlog_cli, rsa_sign_us, write_manifest

# (area, pattern on a frame "function (file:line)"), first match wins; order matters:
# batchlog's signing pool lives in transport.py, the RSA work in signing.py / cryptography.
# generic: only when no specific frame is on the stack
LOOP = "asyncio loop, socket reads and callbacks"
AREAS: list[tuple[str, re.Pattern[str]]] = [
    ("signing: RSA and signing string", re.compile(r"batchlog/signing\.py|cryptography/|_sign ")),
    (
        "thread hand-offs (SigningPool, self-pipe wake-ups)",
        re.compile(
            r"SigningPool\.\w+ \(|^_deliver \(|concurrent/futures|_write_to_self|_read_from_self"
        ),
    ),
    ("pacer and adaptive controller", re.compile(r"batchlog/ratecontrol\.py|aiolimiter/")),
    ("journal (checkpoint) and dead letter", re.compile(r"batchlog/(journal|durable|deadletter)")),
    ("records, manifest, plan, JSON", re.compile(r"batchlog/(manifest|records|plan|valid)|json")),
    ("aiohttp request/response", re.compile(r"aiohttp/|yarl/|multidict/|propcache/|http/")),
    ("batchlog transport (headers, answer)", re.compile(r"batchlog/transport\.py")),
    ("batchlog job / pool / report", re.compile(r"batchlog/")),
    ("anyio layers", re.compile(r"anyio/")),
    (LOOP, re.compile(r"asyncio/|selectors|threading|socket")),
]
OTHER = "other (stdlib, unattributed)"
START = re.compile(r"<frozen importlib|_find_and_load|batchlog/auth\.py|_make_ssl_context")
# a thread waiting, not working: for the GIL (take_gil's condition), on a lock or queue, in
# epoll; seen in py-spy's native frames (its own idle detection fails on this kernel)
IDLE = re.compile(
    r"epoll_wait|pthread_cond_(timed)?wait|PyThread_acquire_lock_timed|take_gil|sem_(timed)?wait"
    r"|PyEval_RestoreThread"
)
PY_FRAME = re.compile(r"\.py:\d+\)$")
LOOP_DISPATCH = re.compile(r"(BaseEventLoop\._run_once|Handle\._run) \(")
# epoll's syscall, its libc address left unnamed by py-spy: waiting for the network
IN_EPOLL = re.compile(r"^EpollSelector\.select \(")
UNNAMED_LIBC = re.compile(r"^0x[0-9a-f]+ \(libc")


def area_of(frame: str) -> str | None:
    for name, pattern in AREAS:
        if pattern.search(frame):
            return name
    return None


def callback_frames(frames: list[str]) -> list[str]:
    """The frames the event loop is running a callback in (a task's step, a protocol's
    read): what is outside, down to anyio.run, is the loop itself and owns nothing."""
    for i in range(len(frames) - 1, -1, -1):
        if LOOP_DISPATCH.match(frames[i]):
            return frames[i + 1 :] if frames[i].startswith("Handle._run ") else []
    return frames  # not the event loop's thread


def owner(frames: list[str]) -> str:
    """The area of the nearest specific frame, innermost first: a socket write made by
    aiohttp is aiohttp's, a wake-up the signing pool sends is the hand-off's; the event
    loop's own (select, a read callback, a timer) when nothing specific is on the stack."""
    areas = [area_of(f) for f in reversed(callback_frames(frames))]
    return next((x for x in areas if x is not None and x != LOOP), LOOP)


def where_in(frames: list[str]) -> str:
    """The innermost Python frame and its caller, and the native leaf under them if any."""
    py = [i for i, f in enumerate(frames) if PY_FRAME.search(f)]
    if not py:
        return frames[-1]
    i = py[-1]
    text = frames[i] + (f" <- {frames[py[-2]]}" if len(py) > 1 else "")
    return text + (f" ({frames[-1]})" if i != len(frames) - 1 else "")


def kind_of(thread: str) -> str:
    """A thread's role from its name (py-spy's 'thread (TID): NAME', or threadcpu's name)."""
    name = thread.rsplit(": ", 1)[-1]
    if name.startswith("batchlog-sign"):
        return "signing threads"
    if name.startswith("AnyIO worker"):
        return "anyio worker threads (manifest reads, journal writes)"
    if name == "MainThread" or name.startswith("thread ("):  # unnamed: main, before threading
        return "event loop (main thread)"
    return f"other thread ({name})"


def parse_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output: 'frame;frame;... count', outermost frame first."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def busy_samples(
    stacks: list[tuple[list[str], int]],
) -> dict[str, list[tuple[list[str], int]]]:
    """Samples of work after start-up, by thread kind (the thread's frame taken off): not
    waiting, not importing or loading credentials, not the interpreter's exit (no Python
    frame: the final garbage collection)."""
    out: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    for frames, count in stacks:
        thread, body = frames[0], frames[1:]
        if not any(PY_FRAME.search(f) for f in body):
            continue
        if any(IDLE.search(f) for f in body[-4:]) or any(START.search(f) for f in body):
            continue
        inner_py = next(f for f in reversed(body) if PY_FRAME.search(f))
        if IN_EPOLL.match(inner_py) and (body[-1] == inner_py or UNNAMED_LIBC.match(body[-1])):
            continue
        out[kind_of(thread)].append((body, count))
    return out


def thread_cpu(
    work: Workdir, emu: EmulatorProcess, manifest: Path, where: Placement, extra: list[str]
) -> tuple[dict[str, float], float]:
    """CPU seconds per thread kind of one upload, and the whole process's (os.wait4)."""
    report = work.root / "threads.json"
    cmd = batchlog_cli(work, emu, manifest, 64, *extra)
    done = run_measured(where.client_cmd([PY, str(HERE / "threadcpu.py"), str(report), *cmd[3:]]))
    if done.returncode != 0:
        sys.exit(f"hotpath: the upload failed:\n{done.stderr[-2000:]}")
    by_kind: Counter[str] = Counter()
    for row in orjson.loads(report.read_bytes()):
        by_kind[kind_of(row["name"])] += row["cpu_s"]
    return dict(by_kind), done.cpu_s


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--latency-ms", type=int, default=5)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--extra", nargs="*", default=[], help="flags added to batchlog upload")
    p.add_argument("--cprofile", action="store_true", help="also a cProfile run (main thread)")
    p.add_argument("--no-pin", action="store_true", help="run nothing pinned")
    p.add_argument("--spy-runs", type=int, default=3, help="py-spy runs, samples summed")
    p.add_argument("--keep", help="copy py-spy's raw stacks to this file")
    p.add_argument("--out", help="write the markdown here too")
    a = p.parse_args()
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("hotpath: py-spy is not installed (pip install py-spy)")
    where = (None if a.no_pin else pinned_placement()) or UNPINNED
    n = a.requests
    lines: list[str] = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="batchlog-hotpath-") as tmp:
        work = Workdir(Path(tmp))
        one = write_manifest(work.root / "one.jsonl", 1)
        manifest = write_manifest(work.root / "m.jsonl", n)
        sign = rsa_sign_us(work)
        emu = EmulatorProcess(work, "--latency-ms", str(a.latency_ms), where=where)
        try:
            start, start_all = thread_cpu(work, emu, one, where, a.extra)
            full, full_all = thread_cpu(work, emu, manifest, where, a.extra)
            raw = work.root / "spy.txt"
            spied = [spy, "record", "--threads", "--native", "-r", str(a.rate), "--format", "raw"]
            with open(raw, "w") as all_runs:
                for i in range(a.spy_runs):
                    cmd = where.client_cmd(batchlog_cli(work, emu, manifest, 64, *a.extra))
                    part = work.root / f"spy-{i}.txt"
                    done = run_measured([*spied, "-o", str(part), "--", *cmd])
                    if done.returncode != 0:
                        sys.exit(f"hotpath: py-spy or batchlog failed:\n{done.stderr[-2000:]}")
                    all_runs.write(part.read_text())
            if a.keep:
                shutil.copy(raw, a.keep)
            prof_path = work.root / "upload.prof"
            if a.cprofile:
                cmd = batchlog_cli(work, emu, manifest, 64, *a.extra)
                profiled = where.client_cmd([PY, "-m", "cProfile", "-o", str(prof_path), *cmd[1:]])
                if run_measured(profiled).returncode != 0:
                    sys.exit("hotpath: the cProfile run failed")
        finally:
            emu.close()
        per = {k: (full.get(k, 0.0) - start.get(k, 0.0)) / max(1, n - 1) * 1e6 for k in full}
        total = (full_all - start_all) / max(1, n - 1) * 1e6
        busy = busy_samples(parse_raw(raw))
        lines_note: dict[str, int] = {}
        area_us: Counter[str] = Counter()
        cum_us: Counter[str] = Counter()
        area_where: dict[str, Counter[str]] = defaultdict(Counter)
        frames_us: Counter[str] = Counter()
        for kind, samples in busy.items():
            count = sum(c for _, c in samples)
            scale = per.get(kind, 0.0) / max(1, count)  # µs per request, per sample
            lines_note[kind] = count
            for frames, c in samples:
                area = owner(frames)
                area_us[area] += c * scale
                for x in {area_of(f) for f in callback_frames(frames)} - {None}:
                    cum_us[str(x)] += c * scale
                area_where[area][kind] += c * scale
                frames_us[f"{area} | {where_in(frames)} [{kind.split(' (')[0]}]"] += c * scale
        lines.append(
            f"`batchlog upload` {' '.join(a.extra) or '(default flags)'} --concurrency 64, "
            f"{n:,} one-record requests, emulator at {a.latency_ms} ms; {where.label}; "
            f"load average {' '.join(f'{x:.2f}' for x in load0)} at the start, "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end.\n"
        )
        lines.append(
            f"Client CPU after start-up: {total:,.0f} µs/request (whole process, os.wait4; "
            f"start-up {start_all:.2f} s on one record). Raw RSA-2048 signature on one "
            f"thread, same run: {sign:.0f} µs; the rest is {total - sign:,.0f} µs/request "
            f"({(total - sign) / sign:.2f} signatures).\n"
        )
        lines.append("| thread | CPU µs/request | share |")
        lines.append("| --- | ---: | ---: |")
        for kind, us in sorted(per.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {kind} | {us:,.0f} | {us / max(1e-9, total):.0%} |")
        lines.append(
            f"\nBy area (py-spy at {a.rate} Hz; a sample goes to the nearest specific frame "
            "from the innermost out; each thread's busy samples are scaled to its measured "
            "CPU; cumulative: samples with the area anywhere on the stack):\n"
        )
        lines.append(
            "| area | µs/request | share | cumulative µs/request | in which threads (µs/request) |"
        )
        lines.append("| --- | ---: | ---: | ---: | --- |")
        for name in [x for x, _ in AREAS] + [OTHER]:
            us = area_us.get(name, 0.0)
            threads = ", ".join(
                f"{k.split(' (')[0]} {v:,.0f}" for k, v in area_where[name].most_common()
            )
            lines.append(
                f"| {name} | {us:,.0f} | {us / max(1e-9, total):.0%} | "
                f"{cum_us.get(name, us):,.0f} | {threads} |"
            )
        lines.append(
            "\nBusy samples used: "
            + ", ".join(f"{k.split(' (')[0]} {v:,}" for k, v in lines_note.items())
            + f" ({a.spy_runs} py-spy runs).\n"
        )
        lines.append(
            "\nTop places (µs/request | area | innermost Python frame <- its caller "
            "(native leaf) [thread]):\n"
        )
        for frame, us in frames_us.most_common(40):
            lines.append(f"- {us:6.1f}  {frame}")
        if a.cprofile:
            lines.append(
                "\ncProfile (main thread only, under the profiler's own overhead; per request):\n"
            )
            stats = pstats.Stats(str(prof_path))
            rows = []
            for (file, line, fn), (_, calls, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
                short = file.split("site-packages/")[-1].split("lib/python3.11/")[-1]
                rows.append((ct, tt, calls, f"{fn} ({short}:{line})"))
            rows.sort(reverse=True)
            lines.append("| function | calls/request | self µs/request | cumulative µs/request |")
            lines.append("| --- | ---: | ---: | ---: |")
            for ct, tt, calls, name in rows[:70]:
                lines.append(
                    f"| {name} | {calls / n:.2f} | {tt / n * 1e6:,.1f} | {ct / n * 1e6:,.1f} |"
                )
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
