#!/usr/bin/env python3
"""The peer of berth's sampler benchmark: seed 004's host-side power sampler
(a daemon thread that reads every device, appends a sample to a list and
sleeps one interval), reading RAPL energy counters from a powercap tree
instead of pynvml, so that it runs where there is no GPU.

Prints one JSON object: process CPU seconds and wall seconds of the sampling
period (interpreter start-up excluded), samples taken, achieved rate.

    python3 scripts/power/poll_loop.py --root /tmp/fake-powercap --rate 100 --seconds 10
"""

import argparse
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PowerSample:
    timestamp: float
    zone: str
    energy_j: float


class PowerSampler:
    def __init__(self, zones: list[Path], sample_rate_hz: float):
        self.zones = zones
        self.interval = 1.0 / sample_rate_hz
        self._samples: list[PowerSample] = []
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()

    def start(self):
        self._samples.clear()
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)
        self._thread.start()

    def stop(self) -> list[PowerSample]:
        self._stop_event.set()
        if self._thread:
            self._thread.join(timeout=2)
        return self._samples.copy()

    def _sample_loop(self):
        # As seed 004: read, append, sleep a whole interval.
        while not self._stop_event.is_set():
            timestamp = time.time()
            for zone in self.zones:
                with open(zone / "energy_uj") as f:
                    energy_uj = int(f.read())
                self._samples.append(PowerSample(timestamp, zone.name, energy_uj / 1e6))
            time.sleep(self.interval)


def zones(root: Path) -> list[Path]:
    found = []
    for path in sorted(root.glob("intel-rapl:*")):
        name = (path / "name").read_text().strip()
        if name.startswith("package") or name == "dram":
            found.append(path)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="powercap tree")
    parser.add_argument("--rate", type=float, required=True, help="Hz")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    devices = zones(args.root)
    sampler = PowerSampler(devices, args.rate)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sampler.start()
    time.sleep(args.seconds)
    samples = sampler.stop()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    ticks = len(samples) / max(len(devices), 1)
    print(json.dumps({
        "cpu_s": cpu,
        "wall_s": wall,
        "devices": len(devices),
        "samples": len(samples),
        "achieved_hz": ticks / wall,
    }))


if __name__ == "__main__":
    main()
