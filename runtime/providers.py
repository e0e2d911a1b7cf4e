"""ONNX Runtime sessions and execution providers: which ones, in what order, with which options.

GPU users expect TensorRT with the CUDA provider behind it (for the nodes TensorRT does not
take), fp16 engines for fp16 bundles, engine and timing caches on disk so that a second start
does not rebuild, and explicit optimisation profiles for the dynamic axes. The CUDA provider
keeps fp32 parity (TF32 off for fp32 bundles) and picks cuDNN algorithms by heuristic instead of
benchmarking every new shape. Everything here is built and checked without a GPU; which
providers actually bound is read back from the session (``get_providers()``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np
import onnx
import onnxruntime as ort

from resclip_deploy import geometry
from resclip_deploy.bundle import Manifest, ModelFacts
from resclip_deploy.errors import UserError
from resclip_deploy.params import ResCLIPParams

from .devices import DEVICES, OPENVINO_DEVICES
from .openvino import OpenVINOSession

log = logging.getLogger("resclip_deploy")

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
PROVIDER_CHAINS = {"tensorrt": [TRT, CUDA, CPU], "cuda": [CUDA, CPU], "cpu": [CPU]}
_GPU_LIBRARIES = {TRT: "TensorRT (libnvinfer) with CUDA and cuDNN",
                  CUDA: "the CUDA runtime and cuDNN"}
# Frames per graph run of the video engine on a GPU (runtime.video); the profiles' largest run
# has at least as many windows (run_levels).
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
    # the graph's sha256: with the engine options it names the engine's folder under cache_dir
    graph: str = ""
    profiles: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)


def provider_options(provider: str, gpu: GpuOptions) -> dict[str, str]:
    """ONNX Runtime's options for ``provider`` (strings, as its Python API takes them)."""
    if provider == TRT:
        opts = {"trt_fp16_enable": "1" if gpu.fp16 else "0",
                "trt_max_workspace_size": str(TRT_WORKSPACE_BYTES)}
        if gpu.fp16:
            # TensorRT may otherwise run LayerNorm in fp16 too, which overflows after attention
            opts["trt_layer_norm_fp32_fallback"] = "1"
        opts.update(profile_options(gpu.profiles))
        if gpu.cache_dir:
            # Engines live in a folder named by the graph and every option that shapes the
            # engine; tactic timings are per layer and shared by all graphs.
            opts.update({"trt_engine_cache_enable": "1",
                         "trt_engine_cache_path": engine_folder(gpu.cache_dir, gpu.graph, opts),
                         "trt_timing_cache_enable": "1", "trt_timing_cache_path": gpu.cache_dir})
        return opts
    if provider == CUDA:
        # TF32 matrix products differ from fp32 by ~1e-3: off where the bundle promises fp32.
        # EXHAUSTIVE (the default) benchmarks cuDNN algorithms for every new input shape.
        return {"use_tf32": "1" if gpu.fp16 else "0", "cudnn_conv_algo_search": "HEURISTIC"}
    return {}


def engine_folder(cache_dir: str, graph: str, engine_options: dict[str, str]) -> str:
    """cache_dir/<key>: the key hashes the graph's checksum with the options an engine is built
    with (precision, profiles, workspace), so that a changed option never meets a stale engine."""
    key = hashlib.sha256(json.dumps([graph, sorted(engine_options.items())]).encode())
    return os.path.join(cache_dir, key.hexdigest()[:16])


# Inputs without a dynamic axis (thresholds): no profile.
SCALAR_INPUTS = ("temp_thd", "prob_thd")
# ONNX Runtime's TensorRT provider builds every profile it is given (an input named again in
# trt_profile_*_shapes starts another one) but runs its engines on profile 0 only: the compute
# function of onnxruntime/core/providers/tensorrt/tensorrt_execution_provider.cc takes the
# context from createExecutionContext() and sets the input shapes on it (BindContextInput:
# setInputShape), never setOptimizationProfileAsync, so a shape outside profile 0 fails there
# (onnxruntime 1.31; https://github.com/microsoft/onnxruntime/pull/31624, open: "its execution
# context remained on profile 0, so inputs belonging to other profiles failed"). Graphs whose
# landscape and portrait runs need different ranges (whole-image mode: the window is the
# image) take one session per orientation (:func:`orientations`, :func:`fits`).
ORIENTATIONS = ("landscape", "portrait")
# One (frames, queries, rows, columns) float32 tensor of the output graph at the profiles'
# maximum. TensorRT sizes an engine's activations for that point, so the output side there
# follows from it (output_tile: ADE20K 640 pixels, at most OUTPUT_TILE_MAX). Only the fused
# chain meets that bound: the segmenter's output graphs run on CUDA, which takes any size.
OUTPUT_RUN_BYTES = 256 << 20
OUTPUT_TILE_MAX = 1024


@dataclass(frozen=True)
class RunShape:
    """One run of the graphs, the point every input of every graph agrees on: ``frames`` images
    of one network size, each cut into ``grid`` (ny, nx) windows of ``window`` (h, w) pixels,
    ``out`` (rows, columns) output pixels per output-graph run, ``queries`` text queries."""

    frames: int
    grid: tuple[int, int]
    window: tuple[int, int]
    out: tuple[int, int]
    queries: int

    @property
    def windows(self) -> int:
        return self.frames * self.grid[0] * self.grid[1]

    def transposed(self) -> "RunShape":
        return RunShape(self.frames, self.grid[::-1], self.window[::-1], self.out[::-1],
                        self.queries)


def run_levels(manifest: Manifest, orientation: str = "landscape",
               queries: Optional[int] = None) -> tuple[RunShape, RunShape, RunShape]:
    """The (min, opt, max) points of the TensorRT profiles, each a run the runtime makes.
    ``queries``: the query count of the vocabulary a graph is built for (the stage graphs);
    None: the bundle's graphs (:func:`query_range`).

    min: one window of one patch a side (thin strips come close), one output pixel. opt: one
    4:3 image, its output at network size. max: the widest image the resize rule makes (short
    side x long-side cap, the most windows and tokens one image has), as many of them as give at
    least GPU_FRAMES_PER_RUN windows: four frames in whole-image mode; one image in slide mode,
    whose windows already fill a GPU (ADE20K: 36 windows, ~7,000 tokens per encoder run) while
    every window adds (Q, 224, 224) pre-pass masks; output tiles of :func:`output_tile` a side.
    A portrait run is the transpose of a landscape one.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation {orientation!r}: one of {ORIENTATIONS}")
    p, patch = manifest.params, manifest.model.patch
    q = query_range(manifest) if queries is None else (queries,) * 3
    widest = _image_run(p, geometry.keep_ratio_size(p.short_side, p.long_side_max,
                                                    p.short_side, p.long_side_max), q[2], 1)
    frames = -(-GPU_FRAMES_PER_RUN // widest.windows)
    tile = _tile_side(frames, q[2])
    typical = _image_run(p, geometry.keep_ratio_size(3, 4, p.short_side, p.long_side_max),
                         q[1], tile)
    levels = (RunShape(1, (1, 1), (patch, patch), (1, 1), q[0]), typical,
              replace(widest, frames=frames, out=(tile, tile)))
    return levels if orientation == "landscape" else tuple(r.transposed() for r in levels)


def query_range(manifest: Manifest) -> tuple[int, int, int]:
    """(min, opt, max) queries of the bundle's graphs. Its own text bank is a graph constant:
    the query count cannot change. A text bank as an input (a --text-encoder bundle) takes a
    vocabulary of any size, each run one; the stage graphs are built per vocabulary."""
    queries = len(manifest.vocabulary.queries)
    return (1, queries, max(4 * queries, 256)) if manifest.text_input else (queries,) * 3


def _image_run(p: ResCLIPParams, hw: tuple[int, int], queries: int, tile: int) -> RunShape:
    """One image of network input size ``hw`` as the runtime cuts it (pipeline.prepare), its
    output at that size (at most ``tile`` a side)."""
    boxes = geometry.window_boxes(hw[0], hw[1], p.mode, p.crop, p.stride)
    y1, y2, x1, x2 = (int(v) for v in boxes[0])
    grid = (len(np.unique(boxes[:, 0])), len(np.unique(boxes[:, 2])))
    return RunShape(1, grid, (y2 - y1, x2 - x1), (min(hw[0], tile), min(hw[1], tile)), queries)


def _tile_side(frames: int, queries: int) -> int:
    """The output side (a multiple of 64, at most OUTPUT_TILE_MAX) whose (frames, queries, side,
    side) float32 tensor stays within OUTPUT_RUN_BYTES."""
    side = math.isqrt(OUTPUT_RUN_BYTES // (4 * frames * queries)) // 64 * 64
    return min(OUTPUT_TILE_MAX, max(64, side))


def output_tile(manifest: Manifest, queries: Optional[int] = None) -> int:
    """The most output rows and columns one run of a graph with the output inside covers
    under TensorRT (its profile ends there): the fused chain's bound there."""
    return run_levels(manifest, queries=queries)[2].out[0]


def input_shape(name: str, run: RunShape, model: ModelFacts) -> Shape:
    """The shape graph input ``name`` (resclip_deploy.bundle.TENSORS, stage_graphs) has in
    ``run``."""
    k, q, (h, w), (ny, nx) = run.windows, run.queries, run.window, run.grid
    gh, gw = h // model.patch, w // model.patch
    n = gh * gw
    t = n + 1                       # tokens: the class token and one per patch
    shapes = {"pixels": (k, 3, h, w), "windows": (k, 3, h, w), "frames": (k, h, w, 3),
              "tokens": (k, t, model.width), "rcs": (k, model.heads, t, t), "window": (t, t),
              "sfr_bias": (k, t, t), "prepass_logits": (k, q, n), "logits": (k, q, n),
              "patch_labels": (k, gh, gw), "connected": (k, n, n),
              "rows": (run.out[0], ny, gh), "cols": (run.out[1], nx, gw),
              "text": (q, model.embed_dim)}
    if name not in shapes:
        raise ValueError(f"graph input {name!r} has no profile rule")
    return shapes[name]


def profile_shapes(manifest: Manifest, inputs: tuple[str, ...], orientation: str = "landscape",
                   queries: Optional[int] = None) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of each dynamic input of a graph (the bundle's, a stage graph, the
    fused chain), all taken from the same three runs (:func:`run_levels`): the inputs of one
    graph agree at every level, as TensorRT checks when it builds the engine. ``queries``: for
    a graph built for one vocabulary (the stage graphs, the fused chain), its query count."""
    levels = run_levels(manifest, orientation, queries)
    return {name: (input_shape(name, levels[0], manifest.model),
                   input_shape(name, levels[1], manifest.model),
                   input_shape(name, levels[2], manifest.model))
            for name in inputs if name not in SCALAR_INPUTS}


def orientations(manifest: Manifest, inputs: tuple[str, ...],
                 queries: Optional[int] = None) -> tuple[str, ...]:
    """The orientations that need a session of their own for a graph with these inputs: only
    'landscape' where both give one profile (slide-mode windows are crop x crop either way; its
    output graph and every whole-image graph differ)."""
    same = profile_shapes(manifest, inputs, "landscape", queries) == \
        profile_shapes(manifest, inputs, "portrait", queries)
    return ORIENTATIONS[:1] if same else ORIENTATIONS


def fits(profiles: dict[str, tuple[Shape, Shape, Shape]], shapes: dict[str, Shape]) -> bool:
    """Whether a run with these input shapes lies within ``profiles`` (min <= size <= max on
    every axis): of a graph's sessions per orientation, the one to run it on."""
    return all(all(low <= size <= high for size, low, high in
                   zip(shape, profiles[name][0], profiles[name][2]))
               for name, shape in shapes.items() if name in profiles)


def max_windows_per_run(manifest: Manifest) -> int:
    """The most windows one run of the graphs takes: the profiles end there, and the runtime
    packs whole images into runs up to it (a single image always fits)."""
    return run_levels(manifest)[2].windows


def profile_options(profiles: dict[str, tuple[Shape, Shape, Shape]]) -> dict[str, str]:
    """TensorRT provider options for one optimisation profile: trt_profile_{min,opt,max}_shapes
    as 'name:AxBxC,...' (nothing without dynamic inputs)."""
    if not profiles:
        return {}
    return {f"trt_profile_{level}_shapes": ",".join(
        f"{name}:{'x'.join(map(str, shapes[i]))}" for name, shapes in profiles.items())
        for i, level in enumerate(("min", "opt", "max"))}


def default_cache_dir(kind: str = "tensorrt") -> str:
    """TensorRT engines and timing caches, or OpenVINO's compiled graphs (``kind``):
    $RESCLIP_CACHE_DIR, else the user's cache folder."""
    root = os.environ.get("RESCLIP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "resclip-deploy")
    return os.path.join(root, kind)


def gpu_options(manifest: Manifest, inputs: tuple[str, ...], graph_sha256: str,
                cache_dir: Optional[str] = None, orientation: str = "landscape",
                queries: Optional[int] = None) -> GpuOptions:
    """One graph's GPU settings; its engines are cached under a folder named by the graph's
    checksum and the engine options (:func:`engine_folder`), so two bundles never share (or
    overwrite) an engine. ``orientation``, ``queries``: as :func:`profile_shapes`."""
    return GpuOptions(fp16=manifest.precision == "fp16",
                      cache_dir=cache_dir or default_cache_dir(), graph=graph_sha256,
                      profiles=profile_shapes(manifest, inputs, orientation, queries))


class ProfiledSessions:
    """A graph under TensorRT whose landscape and portrait runs need profiles of their own: one
    session each (ONNX Runtime runs profile 0 only, see ORIENTATIONS). The landscape session is
    made at once and answers everything but runs; the portrait one when a run first needs it
    (an engine build on a machine without its cached engine)."""

    def __init__(self, landscape: Any, make_portrait: Callable[[], Any],
                 profiles: dict[str, dict[str, tuple[Shape, Shape, Shape]]]):
        self.primary = landscape
        self._sessions = {"landscape": landscape}
        self._make_portrait = make_portrait
        self._profiles = profiles
        self._lock = threading.Lock()

    def for_shapes(self, shapes: dict[str, Shape]) -> Any:
        """The session whose profile holds a run with these input shapes (landscape when none
        does: TensorRT's own error then says why)."""
        if fits(self._profiles["landscape"], shapes) or \
                not fits(self._profiles["portrait"], shapes):
            return self.primary
        with self._lock:
            if "portrait" not in self._sessions:
                self._sessions["portrait"] = self._make_portrait()
            return self._sessions["portrait"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.primary, name)


def graph_session(path: str | bytes, device: str, threads: Optional[int], manifest: Manifest,
                  inputs: tuple[str, ...], graph_sha256: str, cache_dir: Optional[str] = None,
                  queries: Optional[int] = None, fp16: Optional[bool] = None,
                  profile_prefix: Optional[str] = None, arena: bool = False,
                  fallback: bool = False) -> Any:
    """A session of one graph of ``manifest``'s bundle (its own, a stage graph, the fused chain)
    with its GPU options (``fp16``: over the bundle's precision); a :class:`ProfiledSessions`
    where TensorRT bound and the graph's runs need a profile per orientation."""
    def make(orientation: str, dev: str) -> Any:
        gpu = gpu_options(manifest, inputs, graph_sha256, cache_dir, orientation, queries)
        gpu = gpu if fp16 is None else replace(gpu, fp16=fp16)
        return create_session(path, dev, threads, gpu, profile_prefix, arena, fallback)

    session = make("landscape", device)
    if isinstance(session, OpenVINOSession) or session.get_providers()[0] != TRT or \
            len(orientations(manifest, inputs, queries)) == 1:
        return session
    return ProfiledSessions(
        session, lambda: make("portrait", "tensorrt"),
        {o: profile_shapes(manifest, inputs, o, queries) for o in ORIENTATIONS})


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
                   arena: bool = False, fallback: bool = False,
                   ) -> "ort.InferenceSession | OpenVINOSession":
    """An ONNX Runtime session on ``device``; a requested GPU that does not bind is an error
    that carries ONNX Runtime's and TensorRT's own words. ``openvino``/``openvino-bf16``: an
    OpenVINO session instead (runtime/openvino.py; no profiles, its compiled graphs cached under
    default_cache_dir('openvino')).

    onnxruntime-gpu lists GPU providers without a GPU and silently runs on CPU, so the providers
    that actually bound (``get_providers()``) decide. ``auto`` tries TensorRT (CUDA behind it),
    CUDA, then CPU. ``fallback``: a ``tensorrt`` graph that TensorRT refuses runs on CUDA
    instead, with a warning that quotes the refusal (``auto`` after its first graph bound
    TensorRT). ``gpu``: the options of :func:`provider_options` (defaults without one).
    ``path``: a file, or a serialised graph (the stage graphs).
    """
    if device not in DEVICES:
        raise UserError(f"--device {device!r} is not known; choose one of {', '.join(DEVICES)}")
    if device in OPENVINO_DEVICES:
        return OpenVINOSession(path, device, threads, default_cache_dir("openvino"))
    options = session_options(threads, profile_prefix, arena)
    gpu = gpu or GpuOptions()
    available = ort.get_available_providers()
    if device != "cpu" and any(p in available for p in _GPU_LIBRARIES):
        preload_gpu_libraries()
    if device in ("cuda", "tensorrt"):
        chain = PROVIDER_CHAINS[device]
        if chain[0] not in available:
            raise UserError(f"--device {device}: this onnxruntime has no {chain[0]} (installed: "
                            f"{', '.join(available)}); install onnxruntime-gpu, or use "
                            "--device cpu")
        session, said = _try_session(path, options, chain, gpu)
        if session is not None and session.get_providers()[0] == chain[0]:
            return _noted(session, gpu)
        if fallback and device == "tensorrt":
            _warn_once(f"{_graph_name(path)}: TensorRT did not start ({said or 'no reason given'})"
                       "; running on CUDA", said)
            return create_session(path, "cuda", threads, gpu, profile_prefix, arena)
        bound = ", ".join(session.get_providers()) if session else "none"
        raise UserError(f"--device {device}: {chain[0]} did not start for "
                        f"{_graph_name(path)} (bound: {bound}; ONNX Runtime said: "
                        f"{said or 'nothing'}); it needs {_GPU_LIBRARIES[chain[0]]} and a "
                        "visible GPU; or use --device cpu")
    if device == "auto":
        refusals = []
        for name in ("tensorrt", "cuda"):
            chain = [p for p in PROVIDER_CHAINS[name] if p in available or p == CPU]
            if chain[0] == PROVIDER_CHAINS[name][0]:
                session, said = _try_session(path, options, chain, gpu)
                if session is not None and session.get_providers()[0] == chain[0]:
                    for refused, why in refusals:
                        _warn_once(f"{_graph_name(path)}: {refused} did not start ({why}); "
                                   f"running on {chain[0]}", why)
                    return _noted(session, gpu)
                refusals.append((chain[0], said or "no reason given"))
        if refusals:
            # said once per process, in short: onnxruntime-gpu is the default install on
            # Linux x86_64, so every CPU-only machine comes here (log level DEBUG: in full)
            said = "; ".join(f"{name} did not start ({_short(why)})" for name, why in refusals)
            _warn_once(f"no GPU in use: {said}; running on CPU", said)
            log.debug("GPU providers refused: %s", refusals)
    return ort.InferenceSession(path, options, providers=[CPU])


# TensorRT sessions -> how their engine computes: TensorRT allows TF32 for fp32 layers by
# default and ONNX Runtime's TensorRT provider has no option to turn it off (its CUDA provider
# has: use_tf32), so fp32 graphs there are TF32 graphs (~1e-3 relative on matrix products).
_PRECISION_NOTES: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def _noted(session: ort.InferenceSession, gpu: GpuOptions) -> ort.InferenceSession:
    if session.get_providers()[0] == TRT:
        _PRECISION_NOTES[session] = "fp16 engine, LayerNorm fp32" if gpu.fp16 else \
            "fp32 engine, TF32 allowed"
    return session


def providers_of(session: "ort.InferenceSession | OpenVINOSession") -> list[str]:
    """The providers that bound, as reports name them: TensorRT's with its engine's precision
    (OpenVINO sessions describe themselves)."""
    session = getattr(session, "primary", session)
    note = _PRECISION_NOTES.get(session)
    return [f"{p} ({note})" if p == TRT and note else p for p in session.get_providers()]


_warned: set[str] = set()


def _warn_once(message: str, reason: str) -> None:
    """A warning per distinct reason: a missing library would otherwise be said per graph."""
    if reason not in _warned:
        _warned.add(reason)
        log.warning("%s", message)


_preloaded = False


def preload_gpu_libraries() -> None:
    """Load the CUDA and cuDNN libraries of pip's nvidia-* packages before the first GPU
    session: without torch imported first, ONNX Runtime does not look for them there. Once per
    process; what it prints goes to the debug log (a CPU-only machine has none to load)."""
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):      # ONNX Runtime < 1.21
        return
    _preloaded = True
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            ort.preload_dlls()
            # pip's TensorRT (tensorrt-cu1x-libs) loads its libnvinfer on import, where the
            # TensorRT provider then finds it
            if importlib.util.find_spec("tensorrt_libs") is not None:
                importlib.import_module("tensorrt_libs")
    except Exception as e:  # a library it cannot load is reported when a session needs it
        out.write(str(e))
    if out.getvalue().strip():
        log.debug("onnxruntime.preload_dlls: %s", " ".join(out.getvalue().split()))


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
                 gpu: GpuOptions) -> tuple[Optional[ort.InferenceSession], str]:
    """(a session with ``providers`` and their options or None, what ONNX Runtime and TensorRT
    said while creating it). Their log lines (a library that does not load, an engine that
    does not build) are caught from the process's stderr and handed to the caller, who reports
    them in its own words only when the provider did not bind."""
    if gpu.cache_dir and TRT in providers:
        os.makedirs(provider_options(TRT, gpu)["trt_engine_cache_path"], exist_ok=True)
    with _stderr_caught() as said:
        try:
            session = ort.InferenceSession(path, options, providers=[
                (p, provider_options(p, gpu)) for p in providers], enable_fallback=0)
        except (RuntimeError, ValueError) as e:
            session, error = None, str(e)
        else:
            error = ""
    error = _SOURCE_PLACE.sub("", " ".join(error.split()))
    return session, " | ".join(r for r in (_reasons(said.getvalue()), error) if r)


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _stderr_caught():
    """File descriptor 2 into a temporary file for the block: ONNX Runtime and TensorRT log
    from C++, which Python's sys.stderr never sees. One block at a time (a process-wide fd)."""
    text = io.StringIO()
    with _STDERR_LOCK, tempfile.TemporaryFile(mode="w+b") as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.write(tmp.read().decode("utf-8", "replace"))


# '/onnxruntime_src/x.cc:12 void f(T&) [ONNXRuntimeError] : 1 : FAIL : ': where, not why
_SOURCE_PLACE = re.compile(r"/onnxruntime_src/\S+:\d+ |(?:[\w:]+ )?[\w:]+[&*]? ?[\w:]+\([^)]*\)"
                           r" (?:\[ONNXRuntimeError\] : \d+ : \w+ : )?")


def _reasons(log_text: str, limit: int = 600) -> str:
    """The error lines of ONNX Runtime's log (colour codes and timestamps dropped), joined."""
    lines = []
    for line in re.sub(r"\x1b\[[0-9;]*m", "", log_text).splitlines():
        line = re.sub(r"^\S+ \S+ \[[EW]:onnxruntime:[^\]]*\] ", "", line.strip())
        line = _SOURCE_PLACE.sub("", line)
        if line and line not in lines and re.search(r"error|fail|cannot|violat|unsupported",
                                                    line, re.IGNORECASE):
            lines.append(line)
    return " | ".join(lines)[-limit:]


def _short(reason: str) -> str:
    """A refusal's cause: the loader's own error where a library did not load."""
    found = re.search(r"with error: ([^|]+)", reason)
    return (found.group(1) if found else reason).strip()[:200]


def _graph_name(path: str | bytes) -> str:
    """A graph as a message names it: its file, or the name inside a serialised graph."""
    if isinstance(path, bytes):
        return f"the {onnx.load_from_string(path).graph.name} graph"
    return os.path.basename(path)
