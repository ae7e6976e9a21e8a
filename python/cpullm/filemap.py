"""Letting go of the resident pages of read-only file maps (safetensors and GGUF weights)."""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np


def release_file_pages(array: np.ndarray) -> None:
    """Drops this process's resident pages of an array that views a read-only file map (the pages stay
    in the OS page cache; touching them again reads them back). The native model calls this for each
    tensor once it holds its own copy (int8 packed; f32 / bf16 on huge pages where the system has them),
    and a load that converts weights for each source tensor once converted, so loading never keeps both
    forms resident. Arrays that own their memory are left alone: their memory goes when the last
    reference does."""
    base: Any = array
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    if not isinstance(base, mmap.mmap) or array.nbytes == 0 or not hasattr(base, "madvise"):
        return
    start = array.__array_interface__["data"][0] - np.frombuffer(base, np.uint8).__array_interface__["data"][0]
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, (start + array.nbytes) // page * page
    if last > first:
        base.madvise(mmap.MADV_DONTNEED, first, last - first)
