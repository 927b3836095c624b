"""Energy fidelity of the PM1000+ path: what the bench measures vs the power bus ledger.

For each window length (1, 2, 5, 10, 30, 60 s) and duty cycle (5 % to 100 %), a simulated
PM1000+ on its own bus channel is captured through the real driver (PyVISA, pyvisa-py, TCP on
loopback) while its channel draws 0.8 W idle, then for the window 2.4 W bursts of
duty x 100 ms every 100 ms, then idle again. The window is marked at the workload's start and
end, a random fraction of an update period into the instrument's clock; its energy by the trace
and by the integrator is compared with the ledger. Target: under 0.5 % for windows of 10 s and
more.

Running the grid cell by cell would take over 20 minutes, so every cell of a round runs at once
in this process (one simulator, one client and one polling thread each): a round lasts about as
long as its longest window plus ~3 s of capture overhead. The full grid (6 windows x 6 duty
cycles, 36 instruments) takes about 65 s per round; `--quick` (windows up to 10 s, 3 duty
cycles) about 13 s. `--rounds N` repeats with fresh phases and reports the worst error seen.

    .venv/bin/python benchmarks/energy_fidelity.py [--quick] [--rounds N] [--poll-ms 10]
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from dataclasses import dataclass

from labbench.instruments.pm1000 import Pm1000
from labbench.sim.pm1000 import Pm1000Sim
from labbench.sim.powerbus import PowerBus, SquareWave

WINDOWS_S = (1, 2, 5, 10, 30, 60)
DUTIES = (0.05, 0.10, 0.25, 0.50, 0.75, 1.00)
IDLE_W, BURST_W, BURST_PERIOD_S = 0.8, 2.4, 0.1
TARGET = 0.005  # relative, for windows >= 10 s


@dataclass
class Cell:
    window_s: float
    duty: float
    errors: dict[str, float]  # method -> relative error vs the ledger
    uncertainty: dict[str, float]  # method -> relative uncertainty the method claims


def measure(bus: PowerBus, name: str, window_s: float, duty: float, poll_s: float, out: list, failures: list) -> None:
    channel = bus.channel(f"{name}:1")
    channel.set_power(IDLE_W)
    try:
        with Pm1000Sim(name, "127.0.0.1", 0, channel, use_pty=False) as sim:
            with Pm1000(sim.resource, name=name, current_range=3, poll_interval_s=poll_s) as meter:
                with meter.capture() as cap:
                    time.sleep(random.uniform(0.0, 0.5))  # a random phase to the instrument's clock
                    t0 = cap.mark("start")
                    channel.play(SquareWave(IDLE_W, BURST_W, duty * BURST_PERIOD_S, BURST_PERIOD_S, t0, window_s))
                    time.sleep(max(0.0, t0 + window_s - time.monotonic()))
                    cap.mark("end", t0 + window_s)
        truth_j = channel.energy_j(t0, t0 + window_s)
        windows = {m: cap.trace.between("start", "end", method=m) for m in ("trace", "integrator")}
        out.append(Cell(window_s, duty, {m: w.energy_j / truth_j - 1 for m, w in windows.items()},
                        {m: w.uncertainty_j / truth_j for m, w in windows.items()}))  # fmt: skip
    except Exception as e:  # reported with the table; one broken cell must not hide the others
        failures.append(f"{name}: {type(e).__name__}: {e}")


def run_round(windows: tuple, duties: tuple, poll_s: float) -> tuple[list[Cell], list[str]]:
    bus, cells, failures = PowerBus(), [], []
    threads = [
        threading.Thread(target=measure, args=(bus, f"pm_w{w}_d{int(d * 100)}", w, d, poll_s, cells, failures))
        for w in windows for d in duties
    ]  # fmt: skip
    for t in threads:
        t.start()
        time.sleep(0.02)  # stagger the connects
    for t in threads:
        t.join()
    return cells, failures


def worst(cells: list[Cell], key: str, method: str) -> dict[tuple[float, float], float]:
    table: dict[tuple[float, float], float] = {}
    for c in cells:
        value = getattr(c, key)[method]
        k = (c.window_s, c.duty)
        if k not in table or abs(value) > abs(table[k]):
            table[k] = value
    return table


def print_table(title: str, table: dict, windows: tuple, duties: tuple) -> None:
    print(f"\n{title}")
    print("window_s " + "".join(f"{f'duty {d:.0%}':>11}" for d in duties))
    for w in windows:
        row = "".join(f"{table[(w, d)] * 100:>+10.4f}%" if (w, d) in table else f"{'-':>11}" for d in duties)
        print(f"{w:>8} {row}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="windows up to 10 s, duty 5/50/100 %%")
    parser.add_argument("--rounds", type=int, default=1, help="repeat with fresh phases; report the worst")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="the driver's :DSR? poll interval")
    args = parser.parse_args()
    windows = tuple(w for w in WINDOWS_S if w <= 10) if args.quick else WINDOWS_S
    duties = (0.05, 0.5, 1.0) if args.quick else DUTIES
    started = time.monotonic()
    cells, failures = [], []
    for _ in range(args.rounds):
        c, f = run_round(windows, duties, args.poll_ms / 1000)
        cells += c
        failures += f
    elapsed_s = time.monotonic() - started
    print(f"PM1000+ energy vs ledger: idle {IDLE_W} W, bursts {BURST_W} W every {BURST_PERIOD_S * 1000:.0f} ms; "
          f"{len(cells)} captures in {args.rounds} round(s), {elapsed_s:.0f} s, poll {args.poll_ms:g} ms")  # fmt: skip
    for method in ("trace", "integrator"):
        print_table(f"{method}: relative error vs ledger (worst of {args.rounds})", worst(cells, "errors", method),
                    windows, duties)  # fmt: skip
    print_table("trace: claimed uncertainty (largest)", worst(cells, "uncertainty", "trace"), windows, duties)
    for method in ("trace", "integrator"):
        long = [abs(c.errors[method]) for c in cells if c.window_s >= 10]
        if long:
            verdict = "PASS" if max(long) < TARGET else "FAIL"
            print(f"{method}: worst |error| for windows >= 10 s: {max(long) * 100:.4f}% "
                  f"(target < {TARGET * 100:.1f}%): {verdict}")  # fmt: skip
    for failure in failures:
        print(f"FAILED {failure}")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
