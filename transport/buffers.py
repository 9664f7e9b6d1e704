"""Frames: turn caller tensors/arrays into flat byte views UCX can send from or receive into,
without copying. Non-contiguous input is refused: UCX would silently send the first nbytes of raw
memory (NOTES-ucx.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

Frame = Any  # torch.Tensor (CPU or CUDA), numpy.ndarray, bytes, bytearray or memoryview


# CPU tensors of these dtypes take the cheaper numpy route to their bytes (per-message cost).
_NUMPY_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                 torch.float32, torch.float64, torch.bool}


def as_bytes_view(frame: Frame, *, writable: bool) -> Any:
    """A 1-D uint8 view of ``frame`` sharing its memory (something ucxx's Array accepts): a numpy
    array for CPU memory, a uint8 tensor for CUDA memory."""
    if isinstance(frame, torch.Tensor):
        if not frame.is_contiguous():
            raise ValueError(f"non-contiguous tensor of shape {tuple(frame.shape)} refused; "
                             "call .contiguous() first")
        if frame.dtype in _NUMPY_DTYPES and not frame.is_cuda and not frame.requires_grad:
            arr = frame.numpy()
            return arr if arr.ndim == 1 and arr.dtype == np.uint8 else arr.reshape(-1).view(np.uint8)
        # bf16 and friends have no numpy dtype: view the bytes. reshape(-1) of a contiguous
        # tensor is a view, so this never copies (0-d tensors included).
        flat = frame.reshape(-1).view(torch.uint8)
        return flat if flat.is_cuda else flat.numpy()
    if isinstance(frame, np.ndarray):
        if not frame.flags.c_contiguous:
            raise ValueError(f"non-contiguous array of shape {frame.shape} refused")
        if writable and not frame.flags.writeable:
            raise ValueError("read-only array cannot receive a frame")
        return frame.reshape(-1).view(np.uint8)
    if isinstance(frame, (bytes, bytearray, memoryview)):
        view = memoryview(frame)
        if not view.c_contiguous:
            raise ValueError("non-contiguous memoryview refused")
        if writable and view.readonly:
            raise ValueError("read-only buffer cannot receive a frame")
        return np.frombuffer(view.cast("B"), dtype=np.uint8) if view.nbytes else np.empty(0, np.uint8)
    raise TypeError(f"unsupported frame type {type(frame).__name__}")


def nbytes(frame: Frame) -> int:
    if isinstance(frame, torch.Tensor):
        return frame.numel() * frame.element_size()
    if isinstance(frame, np.ndarray):
        return frame.nbytes
    return memoryview(frame).nbytes


def allocate(size: int) -> torch.Tensor:
    """A fresh CPU frame for a reply the caller gave no buffer for."""
    return torch.empty(size, dtype=torch.uint8)


def from_bytes(data: bytes) -> torch.Tensor:
    """A fresh CPU frame holding a copy of ``data``."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else allocate(0)


def copy_in(view: Any, data: bytes) -> None:
    """Copy ``data`` into ``view`` (an ``as_bytes_view`` result of the same size, CPU or CUDA)."""
    if isinstance(view, np.ndarray):
        memoryview(view)[:] = data  # one memcpy, fewer numpy calls than view[:] = frombuffer
    else:
        view.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
