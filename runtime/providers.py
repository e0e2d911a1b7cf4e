"""ONNX Runtime sessions and execution providers: which ones, in what order, with which options.

GPU users expect TensorRT with the CUDA provider behind it (for the nodes TensorRT does not
take), fp16 engines for fp16 bundles, engine and timing caches on disk so that a second start
does not rebuild, and explicit optimisation profiles for the dynamic axes. The CUDA provider
keeps fp32 parity (TF32 off for fp32 bundles) and picks cuDNN algorithms by heuristic instead of
benchmarking every new shape. Everything here is built and checked without a GPU; which
providers actually bound is read back from the session (``get_providers()``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import onnxruntime as ort

from resclip_deploy import geometry
from resclip_deploy.bundle import Manifest
from resclip_deploy.errors import UserError

from .openvino import PRECISIONS as OPENVINO_PRECISIONS
from .openvino import OpenVINOSession

OPENVINO_DEVICES = tuple(OPENVINO_PRECISIONS)

log = logging.getLogger("resclip_deploy")

DEVICES = ("auto", "cpu", "cuda", "tensorrt", *OPENVINO_DEVICES)
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
PROVIDER_CHAINS = {"tensorrt": [TRT, CUDA, CPU], "cuda": [CUDA, CPU], "cpu": [CPU]}
_GPU_LIBRARIES = {TRT: "TensorRT (libnvinfer) with CUDA and cuDNN",
                  CUDA: "the CUDA runtime and cuDNN"}
# Frames per graph run of the video engine on a GPU (runtime.video); the profiles cover them.
GPU_FRAMES_PER_RUN = 4
# TensorRT's builder scratch space; large ViTs need more than its default for their tactics.
TRT_WORKSPACE_BYTES = 4 << 30

Shape = tuple[int, ...]


@dataclass(frozen=True)
class GpuOptions:
    """GPU provider settings for one graph: fp16 engines, the cache folder, and per-input
    (min, opt, max) shapes of the TensorRT optimisation profile."""

    fp16: bool = False
    cache_dir: Optional[str] = None
    profiles: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)


def provider_options(provider: str, gpu: GpuOptions) -> dict[str, str]:
    """ONNX Runtime's options for ``provider`` (strings, as its Python API takes them)."""
    if provider == TRT:
        opts = {"trt_fp16_enable": "1" if gpu.fp16 else "0",
                "trt_max_workspace_size": str(TRT_WORKSPACE_BYTES)}
        if gpu.cache_dir:
            opts.update({"trt_engine_cache_enable": "1", "trt_engine_cache_path": gpu.cache_dir,
                         "trt_timing_cache_enable": "1", "trt_timing_cache_path": gpu.cache_dir})
        if gpu.profiles:
            for i, key in enumerate(("min", "opt", "max")):
                opts[f"trt_profile_{key}_shapes"] = ",".join(
                    f"{name}:{'x'.join(map(str, shapes[i]))}"
                    for name, shapes in gpu.profiles.items())
        return opts
    if provider == CUDA:
        # TF32 matrix products differ from fp32 by ~1e-3: off where the bundle promises fp32.
        # EXHAUSTIVE (the default) benchmarks cuDNN algorithms for every new input shape.
        return {"use_tf32": "1" if gpu.fp16 else "0", "cudnn_conv_algo_search": "HEURISTIC"}
    return {}


def window_counts(manifest: Manifest) -> tuple[int, int]:
    """(windows of a typical 4:3 image, the most windows one graph run takes): the opt and max
    batch of the profiles. The most is four 16:9 video frames or one image at the long-side
    cap, whichever has more windows."""
    p = manifest.params
    if p.mode == "whole":
        return 1, GPU_FRAMES_PER_RUN

    def windows(h: int, w: int) -> int:
        return len(geometry.window_boxes(h, w, "slide", p.crop, p.stride))
    s = p.short_side
    return windows(s, round(s * 4 / 3)), max(GPU_FRAMES_PER_RUN * windows(s, round(s * 16 / 9)),
                                             windows(s, p.long_side_max))


def profile_shapes(manifest: Manifest, inputs: tuple[str, ...],
                   ) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of each graph input from the bundle's settings: windows per run,
    window size (slide: up to crop x crop; whole: the resized image, short side .. long-side
    cap), tokens, heads, width and queries. An input outside its profile would make TensorRT
    build another engine; tests/test_providers.py checks that images of any size stay inside."""
    p, m = manifest.params, manifest.model
    opt_b, max_b = window_counts(manifest)
    # The smallest side is one patch: a very long, thin image is resized to a long side at the
    # cap and a short side of a few patches (thinner ones are refused).
    low = (m.patch, m.patch)
    if p.mode == "slide":
        hw = [low, (p.crop, p.crop), (p.crop, p.crop)]
    else:
        hw = [low, (p.short_side, round(p.short_side * 4 / 3)),
              (p.long_side_max, p.long_side_max)]
    # Tokens: one grid of at most short side x long-side cap (an image is one or the other way).
    grids = [(h // m.patch) * (w // m.patch) for h, w in hw[:2]]
    grids.append((p.crop // m.patch) ** 2 if p.mode == "slide" else
                 (p.short_side // m.patch) * (p.long_side_max // m.patch))
    batches = (1, opt_b, max_b)
    queries = len(manifest.vocabulary.queries)
    # A runtime vocabulary (--text-encoder bundles) may have any size: from 1 to 4x the bundle's.
    q_range = (1, queries, max(4 * queries, 256))
    text = tuple((q, m.embed_dim) for q in q_range)
    # The output graph's merge matrices: (image side, windows along it, window grid side).
    sides = [_axis_profile(p, m.patch, i) for i in range(3)]
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name in inputs:
        rows = []
        for b, (h, w), n, q, side in zip(batches, hw, grids, q_range, sides):
            t = n + 1
            rows.append({"pixels": (b, 3, h, w), "windows": (b, 3, h, w), "frames": (b, h, w, 3),
                         "tokens": (b, t, m.width), "rcs": (b, m.heads, t, t), "window": (t, t),
                         "sfr_bias": (b, t, t), "prepass_logits": (b, q, n),
                         "logits": (b, q, n), "patch_labels": (b, h // m.patch, w // m.patch),
                         "connected": (b, n, n), "rows": side, "cols": side}.get(name))
        if name == "text":
            out[name] = text
        elif rows[0] is not None:            # scalars (thresholds) have no dynamic axis
            out[name] = tuple(rows)
    return out


def _axis_profile(p, patch: int, level: int) -> Shape:
    """(min, opt, max)[level] of one merge matrix: output side up to 8192 pixels."""
    if p.mode == "whole":
        grid = (1, p.short_side // patch, p.long_side_max // patch)[level]
        return ((1, 480, 8192)[level], 1, grid)
    along = (1, 3, len(geometry._axis_windows(p.long_side_max, p.crop, p.stride)))[level]
    return ((1, 480, 8192)[level], along, (1, p.crop // patch, p.crop // patch)[level])


def default_cache_dir(kind: str = "tensorrt") -> str:
    """TensorRT engines and timing caches, or OpenVINO's compiled graphs (``kind``):
    $RESCLIP_CACHE_DIR, else the user's cache folder."""
    root = os.environ.get("RESCLIP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "resclip-deploy")
    return os.path.join(root, kind)


def gpu_options(manifest: Manifest, inputs: tuple[str, ...], graph_sha256: str,
                cache_dir: Optional[str] = None) -> GpuOptions:
    """One graph's GPU settings; its engines are cached under a folder named by the graph's
    checksum, so two bundles never share (or overwrite) an engine."""
    folder = os.path.join(cache_dir or default_cache_dir(), graph_sha256[:16])
    return GpuOptions(fp16=manifest.precision == "fp16", cache_dir=folder,
                      profiles=profile_shapes(manifest, inputs))


def check_device_for_precision(device: str, precision: str) -> str:
    """int8 bundles (dynamic and static) are built and checked for CPU integer kernels: an
    explicit GPU is refused with the advice, and 'auto' stays on the CPU (said in the log)."""
    if not precision.startswith("int8") or device == "cpu" or device in OPENVINO_DEVICES:
        return device
    if device == "auto":
        log.info("int8 bundle: running on CPU (its integer ops have no GPU kernels; export "
                 "with --precision fp16 for GPUs)")
        return "cpu"
    raise UserError(f"--device {device}: an int8 bundle runs on CPUs only (its integer ops "
                    "are built and checked for CPU kernels); export the bundle with --precision "
                    "fp16 for GPUs, or use --device cpu")


def session_options(threads: Optional[int], profile_prefix: Optional[str] = None,
                    arena: bool = False) -> ort.SessionOptions:
    """``profile_prefix``: ONNX Runtime writes a per-node profile there (resclip-bench).
    ``arena``: keep the CPU memory arena (see below) for graphs that are mostly big, short-lived
    activations."""
    options = ort.SessionOptions()
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    # The CPU arena keeps every activation's peak reserved: ~0.5 GB more for ViT-B/16 and six
    # windows, at no measured speed gain here (0.51 s vs 0.57 s per encoder run).
    options.enable_cpu_mem_arena = arena
    # Idle ONNX Runtime threads spin by default, taking the cores from the SFR step that runs
    # between the graphs (and, in the video engine, beside them): measured 0.70 -> 0.77 fps
    # pipelined on the 2-core machine, single images unchanged.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def create_session(path: str | bytes, device: str, threads: Optional[int],
                   gpu: Optional[GpuOptions] = None, profile_prefix: Optional[str] = None,
                   arena: bool = False) -> "ort.InferenceSession | OpenVINOSession":
    """An ONNX Runtime session on ``device``; a requested GPU that does not bind is an error.
    ``openvino``/``openvino-bf16``: an OpenVINO session instead (runtime/openvino.py; no
    profiles, its compiled graphs cached under default_cache_dir('openvino')).

    onnxruntime-gpu lists GPU providers without a GPU and silently runs on CPU, so the providers
    that actually bound (``get_providers()``) decide. ``auto`` tries TensorRT (CUDA behind it),
    CUDA, then CPU. ``gpu``: the options of :func:`provider_options` (defaults without one).
    ``path``: a file, or a serialised graph (the stage graphs).
    """
    if device not in DEVICES:
        raise UserError(f"--device {device!r} is not known; choose one of {', '.join(DEVICES)}")
    if device in OPENVINO_DEVICES:
        return OpenVINOSession(path, device, threads, default_cache_dir("openvino"))
    options = session_options(threads, profile_prefix, arena)
    gpu = gpu or GpuOptions()
    available = ort.get_available_providers()
    if device in ("cuda", "tensorrt"):
        chain = PROVIDER_CHAINS[device]
        if chain[0] not in available:
            raise UserError(f"--device {device}: this onnxruntime has no {chain[0]} (installed: "
                            f"{', '.join(available)}); install onnxruntime-gpu, or use "
                            "--device cpu")
        session = _try_session(path, options, chain, gpu)
        if session is None or session.get_providers()[0] != chain[0]:
            bound = ", ".join(session.get_providers()) if session else "none"
            raise UserError(f"--device {device}: {chain[0]} did not start (bound: {bound}); it "
                            f"needs {_GPU_LIBRARIES[chain[0]]} and a visible GPU; or use "
                            "--device cpu")
        return session
    if device == "auto":
        for name in ("tensorrt", "cuda"):
            chain = [p for p in PROVIDER_CHAINS[name] if p in available or p == CPU]
            if chain[0] == PROVIDER_CHAINS[name][0]:
                session = _try_session(path, options, chain, gpu)
                if session is not None and session.get_providers()[0] == chain[0]:
                    return session
        gpu_names = [p for p in available if p in _GPU_LIBRARIES]
        if gpu_names:
            log.warning("no GPU in use: %s installed but did not start (no GPU, or missing "
                        "CUDA/cuDNN/TensorRT libraries); running on CPU", ", ".join(gpu_names))
    return ort.InferenceSession(path, options, providers=[CPU])


def device_of(session: "ort.InferenceSession | OpenVINOSession") -> str:
    """The --device value that names the provider the session runs on."""
    if isinstance(session, OpenVINOSession):
        return session.device
    first = session.get_providers()[0]
    return next(name for name, chain in PROVIDER_CHAINS.items() if chain[0] == first)


def full_precision(device: str) -> str:
    """The device for graphs that choose their own precision (the text tower, the stage
    graphs): OpenVINO's bf16 mode would lower them too."""
    return "openvino" if device == "openvino-bf16" else device


def memory_of(session: "ort.InferenceSession | OpenVINOSession") -> str:
    """Where the session's inputs and outputs live: 'cpu' (ONNX Runtime's CPU provider and
    OpenVINO on the CPU) or 'cuda'."""
    if isinstance(session, OpenVINOSession) or session.get_providers()[0] == CPU:
        return "cpu"
    return "cuda"


def _try_session(path: str | bytes, options: ort.SessionOptions, providers: list[str],
                 gpu: GpuOptions) -> Optional[ort.InferenceSession]:
    """A session with ``providers`` and their options, or None; ORT's own provider-load chatter
    is silenced (the caller reports in its words)."""
    if gpu.cache_dir and TRT in providers:
        os.makedirs(gpu.cache_dir, exist_ok=True)
    ort.set_default_logger_severity(4)
    try:
        return ort.InferenceSession(path, options, providers=[
            (p, provider_options(p, gpu)) for p in providers], enable_fallback=0)
    except (RuntimeError, ValueError):
        return None
    finally:
        ort.set_default_logger_severity(2)
