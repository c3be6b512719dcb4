"""Bench: how a CPU-bound thread beside an event loop makes the loop's timers late, and how
pacing the thread (``healthd.pacing``: a short sleep after every slice of work) helps.

The loop fires 1,000 timers a second, each doing a little work (``--work-us``), while a thread
does ``--burst-ms`` of pure-Python work every 100 ms. It prints the timers' lateness for no
thread, an unpaced thread and a paced one::

    .venv/bin/python bench/gil_convoy.py
    .venv/bin/python bench/gil_convoy.py --seconds 10 --burst-ms 15 --work-us 50
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time

from healthd import pacing

try:
    import uvloop
except ImportError:  # the standard loop shows the same convoy
    uvloop = None  # type: ignore[assignment]


def _burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _renderer(stop: threading.Event, burst_seconds: float) -> None:
    """A stand-in for an export: pure-Python work in bursts, paced when pacing is on."""
    while not stop.is_set():
        pace = pacing.pacer()
        started = time.perf_counter()
        table: dict[int, str] = {}
        i = 0
        while time.perf_counter() - started < burst_seconds:
            for _ in range(50):
                table[i % 1000] = str(i)
                i += 1
            pace()
        stop.wait(0.1)


async def _timers(seconds: float, work_seconds: float) -> list[float]:
    loop = asyncio.get_running_loop()
    late: list[float] = []
    end = loop.time() + seconds

    async def timer() -> None:
        due = loop.time() + random.random()
        while due < end:
            await asyncio.sleep(max(0.0, due - loop.time()))
            late.append(loop.time() - due)
            _burn(work_seconds)
            due += 1.0

    await asyncio.gather(*(timer() for _ in range(1000)))
    return late


def _run(mode: str, args: argparse.Namespace) -> list[float]:
    stop = threading.Event()
    if mode != "no thread":
        thread = threading.Thread(target=_renderer, args=(stop, args.burst_ms / 1000))
        thread.start()
    # The daemon's own settings: a 1 ms switch interval, and pacing enabled on the loop's thread.
    sys.setswitchinterval(0.001)
    if mode == "paced thread":
        pacing.enable()
    try:
        if uvloop is not None:
            return uvloop.run(_timers(args.seconds, args.work_us / 1e6))
        return asyncio.run(_timers(args.seconds, args.work_us / 1e6))
    finally:
        stop.set()
        pacing.disable()
        if mode != "no thread":
            thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--burst-ms", type=float, default=15.0, help="thread work per 100 ms")
    parser.add_argument("--work-us", type=float, default=50.0, help="loop work per timer")
    parser.add_argument("--runs", type=int, default=2, help="alternating runs of each mode")
    args = parser.parse_args()
    print(f"| run | {'uvloop' if uvloop else 'asyncio'} timers | p50 | p99 | p99.9 | longest |")
    print("|---|---|---|---|---|---|")
    for run in range(1, args.runs + 1):
        for mode in ("no thread", "unpaced thread", "paced thread"):
            late = sorted(_run(mode, args))
            n = len(late)
            figures = [late[n // 2], late[int(n * 0.99)], late[int(n * 0.999)], late[-1]]
            cells = " | ".join(f"{s * 1000:.2f} ms" for s in figures)
            print(f"| {run} | {mode} | {cells} |")


if __name__ == "__main__":
    main()
