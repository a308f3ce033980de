"""What every suite shares: repeated timing with median and spread, machine facts, peak memory, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def summarize(seconds: Sequence[float]) -> dict:
    """Median and spread of repeated timings: median, min, max, p25, p75 and the IQR relative to the median."""
    xs = sorted(float(s) for s in seconds)
    if not xs:
        raise ValueError("no timings to summarise")
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    med = statistics.median(xs)
    return {"median_s": med, "min_s": xs[0], "max_s": xs[-1], "p25_s": q[0], "p75_s": q[2],
            "rel_iqr": (q[2] - q[0]) / med if med > 0 else 0.0, "reps": len(xs), "all_s": xs}


def time_calls(fn: Callable[[], Any], *, warmup: int, reps: int, sync: Callable[[Any], Any] = lambda x: x
               ) -> list[float]:
    """Calls `fn` `warmup` times untimed, then `reps` times timed; `sync` blocks on each result (e.g.
    ``jax.block_until_ready``) so a timing covers the whole computation, not its dispatch."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        sync(fn())
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        out.append(time.perf_counter() - t0)
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meminfo_bytes(field: str = "MemTotal") -> int | None:
    """A /proc/meminfo field in bytes (e.g. ``MemTotal``, ``MemAvailable``); None where unavailable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """Facts about the machine and software a result depends on (JAX backend and devices, CPU, versions)."""
    import jax
    import jaxlib

    devices = jax.devices()
    info = {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": meminfo_bytes("MemTotal"),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_avg_start": _loadavg(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def finish(result: dict, out: str | None) -> dict:
    """Adds the end-of-run load average (a busy machine shows up here), prints the JSON and writes it to `out`."""
    result.setdefault("machine", {})["load_avg_end"] = _loadavg()
    text = json.dumps(result, indent=2, default=_json_default)
    print(text)
    if out:
        from etils import epath

        path = epath.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return result


def _json_default(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    return str(x)


# ----------------------------------------------------------------------------------------------
# Peak memory.


def reset_host_peak() -> bool:
    """Resets this process's peak resident set size (Linux: ``5`` into /proc/self/clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_memory() -> dict:
    """Current and peak resident set size of this process in bytes (Linux /proc/self/status), or {}."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_bytes"] = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    out["peak_rss_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first accelerator since the process started (None on CPU / unsupported)."""
    import jax

    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return None if not stats else stats.get("peak_bytes_in_use")


def parse_ints(text: str) -> list[int]:
    """``"1e3,1e4,2000"`` -> ``[1000, 10000, 2000]``."""
    return [int(float(t)) for t in text.split(",") if t.strip()]
