"""What the host machine has to give: the memory a run about to pin or allocate must fit in."""

from pathlib import Path

from tunelite.errors import ResourceError

MEMINFO = Path("/proc/meminfo")
GIB = 2**30


def available_host_memory(meminfo: Path = MEMINFO) -> int | None:
    """The host memory the kernel could give a new allocation now without swapping (MemAvailable),
    in bytes; None where /proc/meminfo does not say (not Linux)."""
    try:
        for line in meminfo.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "MemAvailable":
                return int(value.split()[0]) * 1024  # kB
    except OSError:
        return None
    return None


def require_host_memory(needed: int, what: str, fix: str, meminfo: Path | None = None, pinned: bool = False) -> None:
    """Refuses, before a run starts, to take more host memory than the machine has available: the
    alternative is the kernel's OOM killer an hour in, or a machine that swaps (and pinned pages
    cannot be swapped at all). `what` needs `needed` bytes; `fix` says what to change."""
    meminfo = meminfo or MEMINFO
    available = available_host_memory(meminfo)
    if available is not None and needed > available:
        raise ResourceError(f"{what} needs {needed / GIB:.1f} GiB of {'pinned ' if pinned else ''}host memory, but "
                            f"only {available / GIB:.1f} GiB is available (MemAvailable in {meminfo}). {fix}")
