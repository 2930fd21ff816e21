"""Host memory of a recipe process: its peak RSS (for the metrics scale/memory.py is checked against) and handing
freed heap back to the OS between the phases of a step."""
from __future__ import annotations


def proc_status_gib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now; VmHWM: the peak since start or reset_peak_rss), in GiB."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def peak_rss_gib() -> float:
    return proc_status_gib("VmHWM")


def reset_peak_rss() -> None:
    """Linux >= 4.0: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


try:                                    # glibc's malloc_trim, where there is one
    import ctypes
    _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _MALLOC_TRIM = None


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). glibc keeps freed blocks for
    reuse, so without it a process's RSS stays near the high-water mark of its largest phase so far (a checkpoint
    gathered into host memory, a loaded state dict) through every later phase. Called after loading or saving a
    checkpoint, and on CPU runs (where activations are host memory) between the phases of a step (scale/README.md:
    the peaks with and without it)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
