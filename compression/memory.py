"""Memory probes: when to stream, the bytes of a model's weights, and the one ``/proc`` field reader.

:func:`needs_offload` is the decision the CLI and :func:`compression.compress` take before the work
(a copy of the weights plus working room against :func:`available_bytes`); :func:`proc_kib` reads the
Linux ``/proc`` fields this one and the CPU peak-memory metric (:class:`compression.evaluate.PeakMemory`)
need. Imports nothing from the project.
"""
from __future__ import annotations

import os

import torch
from torch import nn

FIT_FACTOR = 1.1  # a copy of the weights plus ~10% working room (activations, temporaries)


def proc_kib(path: str, field: str) -> int | None:
    """The value of the ``field:  N kB`` line of a ``/proc`` file, in bytes; None where the file or
    the field is missing (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes(device: torch.device | str) -> int:
    """Free memory where the work would run: the CUDA device's free memory, else the host's
    ``MemAvailable`` (Linux; elsewhere physical pages available)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = proc_kib("/proc/meminfo", "MemAvailable")
    return free if free is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def needs_offload(weight_bytes: int, device: torch.device | str, copies: int) -> tuple[bool, str]:
    """Whether ``copies`` copies of ``weight_bytes`` of weights, times :data:`FIT_FACTOR` (working
    room), exceed the memory available on ``device``; and that comparison as one line.

    The CLI asks before loading with copies = 2 (the dense model and the working copy: 2.2 × the
    weights); :func:`compression.compress` asks for a model already in memory with copies = 1 (1.1 ×)."""
    need, free = FIT_FACTOR * copies * weight_bytes, available_bytes(device)
    verdict = "does not fit" if need > free else "fits"
    return need > free, (f"{verdict}: {copies} × {weight_bytes / 2**30:.2f} GiB of weights × {FIT_FACTOR} "
                         f"= {need / 2**30:.2f} GiB vs {free / 2**30:.2f} GiB available on {torch.device(device)}")


def return_large_frees(threshold: int = 1 << 17) -> bool:
    """Have glibc serve every allocation above ``threshold`` bytes with its own mapping, unmapped when
    freed. By default glibc raises that threshold as large buffers are freed (up to 32 MB), after which
    block- and activation-sized buffers come from the heap and stay resident after use: measured on a
    streamed MoDeGPT run of the default model's first 3 blocks with 64 × 512 calibration tokens, the
    peak went from 1810 MB to 1296 MB. Process-wide, so for a command's own process (the CLI calls it
    when it streams); False where the C library has no ``mallopt``."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights (tied tensors once; placeholders counted at their dtype)."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in model.parameters()}.values())
