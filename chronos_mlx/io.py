"""Background expert I/O: a pool of reader threads and an optional simulated SSD.

Reads are plain `os.pread`s into slot memory (see cache.py); threads release the GIL
while reading, so several expert reads are in flight at once and overlap compute.

`SimulatedSSD` makes every read take as long as it would on a drive of the given
bandwidth and latency: transfers share one bandwidth timeline (queued reads wait for the
bus), latencies of commands in flight together overlap (an NVMe drive has many): a batch
of reads submitted at once (`ShardReader.read_batch`) pays one latency, not one each. On a machine whose
page cache already holds the model this is what makes I/O cost anything at all.
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .errors import ChronosError

_UNIT = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1024, "mi": 1024**2, "gi": 1024**3}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


@dataclass
class SimulatedSSD:
    """Delay reads as a drive with `bandwidth` bytes/s and `latency` seconds per command would."""

    bandwidth: float
    latency: float
    spec: str = ""

    def __post_init__(self):
        self._lock = threading.Lock()
        self._bus_free_at = 0.0

    def schedule(self, sizes: list[int], started: float) -> list[float]:
        """Completion times of read commands of `sizes` bytes submitted together at `started`.

        Their transfers queue on the one bandwidth timeline; their latencies overlap."""
        done = []
        with self._lock:
            t = max(started, self._bus_free_at)
            for n in sizes:
                t += n / self.bandwidth
                done.append(t + self.latency)
            self._bus_free_at = t
        return done


def parse_io_sim(spec: str | None) -> SimulatedSSD | None:
    """'bandwidth=5GB/s,latency=80us' (either key may be left out; a bare '5GB/s' or '80us'
    says which by its unit) -> SimulatedSSD."""
    if not spec or spec == "none":
        return None
    values = {"bandwidth": 5e9, "latency": 80e-6}
    for part in spec.split(","):
        if "=" in part:
            key, value = (s.strip().lower() for s in part.split("=", 1))
        elif re.search(r"b(/s|ps)?\s*$", part.strip().lower()):
            key, value = "bandwidth", part.strip().lower()
        elif re.search(r"[0-9.]\s*(s|ms|us|µs|ns)\s*$", part.strip().lower()):
            key, value = "latency", part.strip().lower()
        else:
            raise ChronosError(f"--io-sim: expected key=value or a bandwidth or latency, got '{part}' "
                               "(e.g. bandwidth=5GB/s,latency=80us, or 5GB/s)")
        if key == "bandwidth":
            m = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]i?)?b(?:/s|ps)?", value)
            if not m:
                raise ChronosError(f"--io-sim: cannot parse bandwidth '{value}' (e.g. 5GB/s)")
            values[key] = float(m.group(1)) * _UNIT[m.group(2) or ""]
        elif key == "latency":
            m = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(s|ms|us|µs|ns)", value)
            if not m:
                raise ChronosError(f"--io-sim: cannot parse latency '{value}' (e.g. 80us)")
            values[key] = float(m.group(1)) * _TIME[m.group(2)]
        else:
            raise ChronosError(f"--io-sim: unknown key '{key}' (bandwidth, latency)")
    if not 0 < values["bandwidth"] < float("inf"):
        raise ChronosError("--io-sim: bandwidth must be positive")
    return SimulatedSSD(values["bandwidth"], values["latency"], spec)


class IOPool:
    """Reader threads shared by demand loads and prefetches."""

    def __init__(self, threads: int = 4):
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="chronos-io")

    def submit(self, fn, *args):
        return self._pool.submit(fn, *args)

    def shutdown(self):
        self._pool.shutdown(wait=True, cancel_futures=True)
