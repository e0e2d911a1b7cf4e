"""The pre-pass stage's ``kernel`` implementation: resclip_deploy.pamr_cuda's kernels on ONNX
Runtime's device buffers.

How the buffers are shared. An OrtValue on the CUDA device exposes its device pointer
(``data_ptr``), shape and element type; the kernels take it as a numba device array through the
CUDA Array Interface (version 3, C-contiguous, no stream to wait on), which copies nothing.
ONNX Runtime's CUDA provider works in the device's primary context (the CUDA runtime API's) and
numba's driver retains the same one, so a pointer is valid in both. The outputs are OrtValues
that ONNX Runtime allocates on the device; the kernels write them in place and the next graph
binds them as its inputs.

Order. ``run_with_iobinding`` returns after ONNX Runtime has synchronised its stream, so the
encoder's outputs are complete when the kernels start; the kernels run on a stream of their own,
which the stage synchronises before it returns: a graph that reads the outputs starts after they
are written.

Without a device (``NUMBA_ENABLE_CUDASIM=1``: the tests) the OrtValues are ONNX Runtime CPU
tensors, viewed in place as numpy arrays at the same pointers, and numba's CUDA simulator runs
the same kernels over them.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Optional, Union

import numpy as np
import onnxruntime as ort

from resclip_deploy import pamr_cuda
from resclip_deploy.params import PAMR_DILATIONS, PAMR_ITERATIONS
from resclip_deploy.stages import KERNEL

# What a GPU host installs for the kernels (docs/segment.md, "GPU hosts").
INSTALL = "pip install 'resclip-deploy[gpu]' (CUDA 13) or 'resclip-deploy[gpu-cu12]' (CUDA 12)"
Array = Union[np.ndarray, ort.OrtValue]


def _numba_cuda() -> tuple[Any, Optional[str]]:
    """(numba.cuda, None), or (None, why it cannot be imported)."""
    try:
        from numba import cuda
        from numba.cuda import libdevice  # noqa: F401  (numba-cuda's; old numba lacks it)
    except ImportError as e:
        return None, f"numba-cuda is not installed ({e}); {INSTALL}"
    return cuda, None


def simulated() -> bool:
    """Whether numba's CUDA target is its simulator (NUMBA_ENABLE_CUDASIM=1)."""
    from numba import config
    return bool(config.ENABLE_CUDASIM)


def kernel_availability(memory: str) -> tuple[bool, Optional[str]]:
    """For segmenter graphs whose tensors live on ``memory`` ('cuda' or 'cpu'): (whether the
    stage table may choose the kernel, why a request for it is refused or None).

    The table chooses it on a CUDA device that numba can use; numba's simulator runs it on
    request only (on CPU tensors, for tests: far too slow to choose)."""
    cuda, missing = _numba_cuda()
    if missing:
        return False, missing
    if simulated():
        return False, None
    if memory != "cuda":
        return False, ("runs on a CUDA device, and these graphs run on the CPU (use "
                       "--device cuda, or NUMBA_ENABLE_CUDASIM=1 to simulate it, slowly)")
    if not cuda.is_available():
        return False, ("numba finds no CUDA device or driver (numba -s says why); the graphs "
                       f"found one: {INSTALL}")
    return True, None


def array_interface(pointer: int, shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    """The CUDA Array Interface (v3) of a C-contiguous device buffer. No ``stream``: its writer
    (an ONNX Runtime run, or this stage) has synchronised before anyone reads it."""
    return {"shape": tuple(int(s) for s in shape), "typestr": np.dtype(dtype).str,
            "data": (int(pointer), False), "strides": None, "version": 3, "stream": None}


def _dtype(value: ort.OrtValue) -> np.dtype:
    """'tensor(float16)' -> float16."""
    name = value.data_type()[len("tensor("):-1]
    return np.dtype({"float": np.float32, "double": np.float64}.get(name, name))


def view(value: Array, shape: Optional[tuple[int, ...]] = None) -> Any:
    """An OrtValue (or a numpy array) as an array the kernels take, in place, viewed as
    ``shape`` (same size, C order): a numba device array over a CUDA OrtValue; under the
    simulator, a numpy array over a CPU OrtValue's memory."""
    if isinstance(value, np.ndarray):
        return value.reshape(shape or value.shape)
    dtype, size = _dtype(value), int(np.prod(value.shape()))
    shape = tuple(shape or value.shape())
    if int(np.prod(shape)) != size:
        raise ValueError(f"cannot view {value.shape()} as {shape}")
    if value.device_name() == "cpu":
        if not simulated():
            raise ValueError("a CPU OrtValue reaches the CUDA kernels only in numba's simulator")
        raw = (ctypes.c_char * (size * dtype.itemsize)).from_address(value.data_ptr())
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    from numba import cuda
    return cuda.from_cuda_array_interface(array_interface(value.data_ptr(), shape, dtype),
                                          owner=value, sync=False)


class KernelPrepass:
    """The SFR pre-pass as CUDA kernels: (K, Q, N) logits and (K, 3, h, w) windows, on the
    device -> argmax and max probability (K, h, w) and patch labels (K, gh, gw), OrtValues on
    the device, as the pre-pass graph gives them. One run at a time (its scratch is shared)."""

    def __init__(self, logit_scale: float, patch: int, half: bool, memory: str):
        self.scale, self.patch, self.half, self.memory = logit_scale, patch, half, memory
        self._cuda, _ = _numba_cuda()
        self._kernels = pamr_cuda.kernels(PAMR_DILATIONS, patch)
        self._lock = threading.Lock()
        self._stream: Any = None
        self._scratch: dict[Any, tuple[Any, ...]] = {}

    @property
    def provider(self) -> str:
        where = "numba's CUDA simulator" if simulated() else "CUDA"
        return f"{KERNEL}: numba-cuda on {where}" + (", fp16 masks" if self.half else "")

    def __call__(self, logits: Array, windows: Array, temp_thd: float,
                 ) -> tuple[ort.OrtValue, ort.OrtValue, ort.OrtValue]:
        for name, value in (("prepass_logits", logits), ("windows", windows)):
            if _dtype_of(value) != np.float32:
                raise ValueError(f"the pre-pass kernels take float32 {name}, not "
                                 f"{_dtype_of(value)}")
        k, q = _shape(logits)[:2]
        h, w = _shape(windows)[2:]
        grid_hw = (h // self.patch, w // self.patch)
        plan = pamr_cuda.Plan(k, q, (h, w), grid_hw, PAMR_ITERATIONS, self.patch, self.half)
        with self._lock:
            out = self._outputs(k, h, w, grid_hw)
            if self._stream is None:
                self._stream = self._cuda.stream()
            scratch, tables = self._buffers(plan)
            pamr_cuda.run(self._kernels, plan, view(logits, (k, q) + grid_hw),
                           view(windows), tuple(view(o) for o in out), scratch, tables,
                           self.scale, temp_thd, self._stream)
            self._stream.synchronize()
        return out

    def _outputs(self, k: int, h: int, w: int, grid_hw: tuple[int, int]) -> tuple[Any, ...]:
        """argmax, maxprob, patch labels: allocated by ONNX Runtime where the graphs run."""
        new = ort.OrtValue.ortvalue_from_shape_and_type
        return (new([k, h, w], np.int64, self.memory, 0),
                new([k, h, w], np.float32, self.memory, 0),
                new([k, *grid_hw], np.int64, self.memory, 0))

    def _buffers(self, plan: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """The weights, masks and bilinear tables of this geometry, kept for the next run (a
        video's frames, a server's images of one size)."""
        key = (plan.windows, plan.queries, plan.hw)
        if key not in self._scratch:
            self._scratch.clear()
            k, q, (h, w) = plan.windows, plan.queries, plan.hw
            shapes = [(k, plan.neighbours, h, w)] + [(k, q, h, w)] * plan.mask_buffers
            (ry, wy), (rx, wx) = (pamr_cuda.bilinear_tables(g, s)
                                  for g, s in zip(plan.grid_hw, plan.hw))
            scratch = tuple(self._cuda.device_array(s, plan.dtype, stream=self._stream)
                            for s in shapes)
            tables = tuple(self._cuda.to_device(t, stream=self._stream)
                           for t in (ry, wy, rx, wx))
            self._scratch[key] = (scratch, tables)
        return self._scratch[key]


def _shape(value: Array) -> tuple[int, ...]:
    return tuple(value.shape() if isinstance(value, ort.OrtValue) else value.shape)


def _dtype_of(value: Array) -> np.dtype:
    return _dtype(value) if isinstance(value, ort.OrtValue) else value.dtype


def stage_rules(memory: str, requested: Optional[dict[str, str]] = None,
                ) -> tuple[tuple[str, ...], dict[str, str]]:
    """:func:`stages.choose`'s ``skip`` and ``refused`` for the kernel, for graphs on
    ``memory``; numba is imported only where the kernel could be chosen or is asked for."""
    requested = requested or {}
    if memory == "cpu" and KERNEL not in requested.values() and requested.get("all") != "gpu":
        return (KERNEL,), {}
    auto, why = kernel_availability(memory)
    return (() if auto else (KERNEL,)), ({KERNEL: why} if why else {})
