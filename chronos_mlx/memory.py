"""How much memory this process may use: the machine's, a cgroup's, or a user's limit.

- Linux: `MemAvailable` from /proc/meminfo (what can be allocated without swapping: free
  memory plus reclaimable page cache), capped by a cgroup v2/v1 memory limit when one is set.
- macOS: total RAM (`hw.memsize`) minus what other processes hold (wired + active +
  compressed pages per `vm_stat`), capped by Metal's recommended working set
  (`mx.device_info()['max_recommended_working_set_size']`) when the GPU backend is present.
- Elsewhere: total physical memory, with a note that it is an upper bound.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional


@dataclass
class MachineMemory:
    total_bytes: int  # physical RAM
    available_bytes: int  # what this process may use now
    source: str  # where available_bytes comes from, in words
    recommended_working_set_bytes: Optional[int] = None  # Metal's, on Apple GPUs

    def to_dict(self) -> dict:
        return asdict(self)


def _meminfo(path: str = "/proc/meminfo") -> dict:
    out = {}
    try:
        for line in Path(path).read_text().splitlines():
            m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
            if m:
                out[m.group(1)] = int(m.group(2)) * 1024
    except OSError:
        pass
    return out


def _cgroup_room() -> Optional[tuple[int, str]]:
    """(bytes left under this process's cgroup memory limit, which file) or None."""
    candidates = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ]
    for limit_file, usage_file in candidates:
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit():
            continue
        limit = int(text)
        if limit >= 1 << 60:  # v1's "no limit"
            continue
        try:
            used = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            used = 0
        return max(0, limit - used), limit_file
    return None


def _metal_working_set() -> Optional[int]:
    try:
        import mlx.core as mx

        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        value = info.get("max_recommended_working_set_size")
        return int(value) if value else None
    except Exception:
        return None


def _physical_total() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _macos_others_hold() -> Optional[int]:
    """Bytes held by wired, active and compressed pages (what other processes and the OS
    keep; inactive, speculative and free pages can be reclaimed)."""
    try:
        text = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"page size of (\d+) bytes", text)
    page = int(m.group(1)) if m else 16384
    pages = {}
    for key, value in re.findall(r'^"?([^:"]+)"?:\s+(\d+)\.', text, re.M):
        pages[key.strip()] = int(value)
    held = sum(pages.get(k, 0) for k in ("Pages wired down", "Pages active", "Pages occupied by compressor"))
    return held * page if held else None


def machine_memory() -> MachineMemory:
    """What this process may use now (see the module docstring)."""
    total = _physical_total()
    if sys.platform.startswith("linux"):
        info = _meminfo()
        total = info.get("MemTotal", total)
        avail = info.get("MemAvailable", info.get("MemFree", total))
        source = "MemAvailable in /proc/meminfo"
        cg = _cgroup_room()
        if cg is not None and cg[0] < avail:
            avail, source = cg[0], f"room under the cgroup limit ({cg[1]})"
        return MachineMemory(total, avail, source)
    if sys.platform == "darwin":
        held = _macos_others_hold()
        avail = total - held if held is not None else total
        source = "total RAM minus wired, active and compressed pages (vm_stat)" if held is not None else "total RAM"
        ws = _metal_working_set()
        if ws is not None and ws < avail:
            avail, source = ws, "Metal's recommended working set"
        return MachineMemory(total, avail, source, ws)
    return MachineMemory(total, total, "total RAM (an upper bound: what others hold is unknown here)")
