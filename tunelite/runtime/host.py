"""What the host machine has to give: the memory a run about to pin or allocate must fit in."""

from pathlib import Path

MEMINFO = Path("/proc/meminfo")


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
