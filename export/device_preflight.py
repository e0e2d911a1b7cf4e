"""The device check's preflight: what ONNX Runtime finds on this machine, in seconds, torch-free.

    python -P -m resclip_deploy.export.device_preflight

Prints one JSON line: onnxruntime's file, package and version, its available providers,
``onnxruntime.preload_dlls()`` (ONNX Runtime >= 1.21; what it printed and which CUDA libraries
the process then has mapped), a one-node CUDA session (which providers it bound, whether it
added correctly), numba-cuda (the pre-pass kernels': whether it finds the device, and a
one-line kernel compiled with NVVM and run), and the GPUs nvidia-smi lists. Nothing here fails
for want of a GPU: each step records its error instead.

The device check runs this in a child process before it imports torch, because torch loads
CUDA libraries of its own: only a process without torch shows what the torch-free runtime
finds. It imports nothing of the runtime either, so that no preloading done there hides what
ONNX Runtime finds by itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Any, Optional

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

CUDA = "CUDAExecutionProvider"
# Shared libraries worth naming in the report: the CUDA runtime pieces ONNX Runtime's CUDA
# provider links against, cuDNN, TensorRT, and ONNX Runtime's own provider libraries.
LIBRARY_PREFIXES = ("libcudart", "libcublas", "libcudnn", "libcurand", "libcufft", "libnvrtc",
                    "libnvinfer", "libcuda.so", "libonnxruntime_providers")
NVIDIA_SMI_TIMEOUT_S = 10


def add_model() -> bytes:
    """A one-node graph (z = x + y over two floats): a session of it shows which providers bind.
    Opset 17 and IR 8 load in every ONNX Runtime this project supports."""
    io_info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "xyz"]
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "add",
                              io_info[:2], io_info[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def one_line(text: str, limit: int = 600) -> str:
    """An error or log text as one line, cut to ``limit`` characters (its end kept, where the
    cause usually is)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else "…" + flat[-limit:]


def package_info() -> dict[str, Any]:
    """Which onnxruntime this process imported: file, distribution, version, CUDA it was built
    for (the GPU package records it)."""
    info: dict[str, Any] = {"file": ort.__file__, "version": ort.__version__}
    try:
        from onnxruntime.capi import build_and_package_info as built
    except ImportError:
        return info
    info["package"] = getattr(built, "package_name", None)
    info["cuda_version"] = getattr(built, "cuda_version", None)
    return info


def preload() -> dict[str, Any]:
    """``onnxruntime.preload_dlls()`` where it exists, with what it printed and warned."""
    if not hasattr(ort, "preload_dlls"):
        return {"present": False}
    printed = io.StringIO()
    start = time.perf_counter()
    error: Optional[str] = None
    with contextlib.redirect_stdout(printed), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ort.preload_dlls()
        except Exception as e:  # recorded: a failed preload is a finding, not a crash
            error = one_line(f"{type(e).__name__}: {e}")
    said = printed.getvalue() + "".join(f"{w.message}\n" for w in caught)
    return {"present": True, "seconds": round(time.perf_counter() - start, 3),
            "printed": one_line(said) if said.strip() else "", "error": error}


def mapped_libraries(maps_text: str) -> dict[str, str]:
    """``/proc/<pid>/maps`` text -> {library file name: its path} for LIBRARY_PREFIXES."""
    found: dict[str, str] = {}
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)             # address perms offset dev inode path
        path = fields[5] if len(fields) == 6 else ""
        name = os.path.basename(path)
        if name.startswith(LIBRARY_PREFIXES):
            found.setdefault(name, path)
    return found


def loaded_libraries() -> Optional[dict[str, str]]:
    """The listed libraries this process has mapped now (Linux), None elsewhere."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return mapped_libraries(f.read())
    except OSError:
        return None


def cuda_session() -> dict[str, Any]:
    """A session of the one-node graph asking for CUDA first: the providers it bound and
    whether it computed [1, 2] + [3, 4] right."""
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(add_model(), providers=[CUDA, "CPUExecutionProvider"])
        x, y = np.array([1, 2], np.float32), np.array([3, 4], np.float32)
        z = session.run(["z"], {"x": x, "y": y})[0]
    except Exception as e:  # recorded, as a provider that does not start
        return {"error": one_line(f"{type(e).__name__}: {e}"),
                "seconds": round(time.perf_counter() - start, 3)}
    providers = session.get_providers()
    return {"providers": providers, "cuda_bound": CUDA in providers,
            "add_correct": bool(np.array_equal(z, x + y)),
            "seconds": round(time.perf_counter() - start, 3)}


def numba_cuda() -> dict[str, Any]:
    """numba-cuda, which the pre-pass's kernels need: its version, whether it finds a device,
    and a one-line kernel compiled (NVVM, libdevice) and run on it."""
    start = time.perf_counter()
    info: dict[str, Any] = {}
    try:
        from importlib.metadata import version

        from numba import config, cuda
        info.update(version=version("numba-cuda"), simulator=bool(config.ENABLE_CUDASIM),
                    available=cuda.is_available())
        if info["available"]:
            @cuda.jit
            def add(x, y, z):              # one thread (numba's simulator swaps only globals)
                for i in range(z.size):
                    z[i] = x[i] + y[i]
            x, y = np.array([1, 2], np.float32), np.array([3, 4], np.float32)
            z = cuda.device_array(2, np.float32)
            add[1, 1](x, y, z)
            info["add_correct"] = bool(np.array_equal(z.copy_to_host(), x + y))
    except Exception as e:  # recorded: the runtime then takes the pre-pass graph
        info["error"] = one_line(f"{type(e).__name__}: {e}")
    info["seconds"] = round(time.perf_counter() - start, 3)
    return info


def parse_gpus(csv_text: str) -> list[dict[str, Any]]:
    """nvidia-smi's ``name, memory.total, driver_version`` CSV (no header, no units) -> one
    dict per GPU."""
    gpus = []
    for line in csv_text.strip().splitlines():
        name, memory, driver = (field.strip() for field in line.rsplit(",", 2))
        gpus.append({"name": name, "memory_total_mib": float(memory), "driver": driver})
    return gpus


def nvidia_smi() -> dict[str, Any]:
    """The GPUs nvidia-smi lists, or why it could not say."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": one_line(f"{type(e).__name__}: {e}")}
    if out.returncode != 0:
        return {"error": one_line(out.stderr or out.stdout or f"exit {out.returncode}")}
    try:
        return {"gpus": parse_gpus(out.stdout)}
    except ValueError:
        return {"error": one_line(f"unreadable nvidia-smi output: {out.stdout}")}


def preflight() -> dict[str, Any]:
    """Every step above, in order (preload before the session, as the runtime would)."""
    start = time.perf_counter()
    report: dict[str, Any] = {"python": sys.version.split()[0], "onnxruntime": package_info(),
                              "available_providers": ort.get_available_providers(),
                              "preload_dlls": preload()}
    report["cuda_session"] = cuda_session()
    report["libraries"] = loaded_libraries()
    report["numba_cuda"] = numba_cuda()
    report["nvidia_smi"] = nvidia_smi()
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def main() -> int:
    print(json.dumps(preflight()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
