"""resclip-bench: where the time goes, per stage, against the torch reference in the same run.

The runtime is timed in this process (no torch imported, so its peak memory is the runtime's);
the torch reference runs on the same image in a subprocess. Medians over --runs after a warm-up.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from typing import Any, Callable, Iterator, Optional, Sequence

import click
import cv2
import numpy as np
import onnx

from . import geometry, pamr_cuda, stage_graphs
from .cli import _setup_logging, device_option, run_command, user_errors
from .errors import UserError
from .io import read_image, write_json
from .params import PAMR_ITERATIONS
from .pipeline import prepare
from .stages import parse_stages

TIMED_STAGES = ("preprocess", "encoder", "sfr", "head", "merge", "output")
# Every stage as a GPU runs it (stages.TIMED_STAGES' gpu column), on whatever device this is.
GPU_PLAN = {"all": "gpu"}


def bench_photo(size: Optional[tuple[int, int]]) -> np.ndarray:
    """The package's photo (CC0 'chelsea'), resized to ``size`` (H, W) when given."""
    with resources.as_file(resources.files("resclip_deploy") / "data" / "chelsea.png") as path:
        rgb = read_image(str(path))
    if size is None:
        return rgb
    return cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def providers_line(providers: dict[str, list[str]]) -> str:
    """Where the graphs ran: one list when all ran alike, else per graph (e.g. OpenVINO's bf16
    encoder beside its f32 head)."""
    kinds = {", ".join(p) for p in providers.values()}
    if len(kinds) == 1:
        return kinds.pop()
    return "; ".join(f"{graph}: {', '.join(p)}" for graph, p in providers.items())


def time_runtime(segmenter: Any, rgb: np.ndarray, runs: int, warmup: int,
                 alongside: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    """Median seconds per image and per stage over ``runs`` after ``warmup``. ``alongside``:
    run (and timed, ``alongside_s``) after each image, so that both see the same drift of a
    noisy machine."""
    for _ in range(warmup):
        segmenter.segment(rgb, with_probs=False)
    totals, stages, host, io, other = [], [], [], None, []
    for _ in range(runs):
        segmenter.io = type(segmenter.io)()
        start = time.perf_counter()
        out = segmenter.segment(rgb, with_probs=False)
        totals.append(time.perf_counter() - start)
        stages.append(out.timings)
        io = segmenter.io
        host.append(totals[-1] - io.graph_s)
        if alongside is not None:
            start = time.perf_counter()
            alongside()
            other.append(time.perf_counter() - start)
    return {"total_s": statistics.median(totals),
            "stages_s": {k: statistics.median(s.get(k, 0.0) for s in stages) for k in TIMED_STAGES},
            # Critical path outside graph runs (decode/encode of files excluded: not timed here)
            "host_s": statistics.median(host),
            "graph_runs": io.runs, "bytes_to_device": io.to_device, "bytes_to_host": io.to_host,
            "labels": out.labels,
            "alongside_s": statistics.median(other) if other else None}


def window_sweep(segmenter: Any, rgb: np.ndarray, counts: tuple[int, ...],
                 runs: int) -> list[dict[str, float]]:
    """Graphs + SFR for K windows of the image (repeated if it has fewer): linear in K?"""
    windows = prepare(rgb, segmenter.params.replace(mode="slide"), segmenter.patch,
                      segmenter.norm).windows
    rows = []
    for k in counts:
        batch = windows[np.arange(k) % len(windows)]
        segmenter.run_windows(batch)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            segmenter.run_windows(batch)
            times.append(time.perf_counter() - start)
        t = statistics.median(times)
        rows.append({"windows": k, "seconds": t, "seconds_per_window": t / k})
    return rows


def time_reference(bundle: str, rgb: np.ndarray, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        array, labels = os.path.join(tmp, "rgb.npy"), os.path.join(tmp, "labels.npy")
        np.save(array, rgb)
        args = json.dumps({"bundle": bundle, "array": array, "runs": runs,
                           "labels_out": labels})
        result = subprocess.run([sys.executable, "-m", "resclip_deploy.export.bench_reference",
                                 args], capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"the torch reference did not run ({tail}); it needs the [export] "
                            "extra and the bundle's source checkpoint")
        out = json.loads(result.stdout.strip().splitlines()[-1])
        out["labels"] = np.load(labels)
    return out


def labels_agreement(segmenter: Any, baseline_dir: str, threads: Optional[int],
                     images: Sequence[np.ndarray], names: Sequence[str]) -> dict[str, Any]:
    """The fraction of pixels whose label equals the fp32 baseline's (ONNX Runtime, CPU), per
    image and over all pixels."""
    from .runtime.segmenter import Segmenter
    baseline = Segmenter.from_bundle(baseline_dir, device="cpu", threads=threads)
    if baseline.bundle.manifest.precision != "fp32":
        raise UserError(f"--against {baseline_dir}: an {baseline.bundle.manifest.precision} "
                        "bundle; the baseline must be fp32")
    equal, total, per = 0, 0, {}
    for name, rgb in zip(names, images):
        same = segmenter.segment(rgb, with_probs=False).labels == \
            baseline.segment(rgb, with_probs=False).labels
        equal, total = equal + int(same.sum()), total + same.size
        per[os.path.basename(name)] = float(same.mean())
    return {"baseline": os.path.abspath(baseline_dir), "images": per, "all": equal / total}


def floor_tower(segmenter: Any, bundle: str, rgb: np.ndarray, device: str,
                threads: Optional[int], tmp: str) -> tuple[Callable[[], None], dict[str, Any]]:
    """The floor: a plain ViT tower of the bundle's size (export/floor.py, in a subprocess with
    torch) on this image's windows, in ONNX Runtime in this process with the runtime's own
    session options -> (one run of it, warmed up; what it is)."""
    from .runtime.providers import OPENVINO_DEVICES, create_session
    windows = prepare(rgb, segmenter.params, segmenter.patch, segmenter.norm).windows
    path = os.path.join(tmp, "floor.onnx")
    args = json.dumps({"bundle": os.path.abspath(bundle), "hw": list(windows.shape[2:]),
                       "batch": len(windows), "out": path})
    result = subprocess.run([sys.executable, "-m", "resclip_deploy.export.floor", args],
                            capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"the floor's plain ViT tower could not be exported ({tail}); it "
                        "needs the [export] extra, or use --no-floor")
    # ONNX Runtime's CPU provider on a CPU, whichever runtime the bundle ran on
    session = create_session(path, "cpu" if device in OPENVINO_DEVICES else device, threads)
    feeds = {session.get_inputs()[0].name: windows}
    session.run(None, feeds)
    return (lambda: session.run(None, feeds)), {"windows": len(windows),
                                                 "providers": session.get_providers()}


# HBM bandwidth of an H200-class GPU: graph traffic / this = the time it implies, unfused.
GPU_BYTES_PER_S = 4e12
# What the pre-pass's bytes are read against: about what an H100 SXM (3.35 TB/s peak) and an
# H200 (4.8 TB/s peak) stream in practice.
PREPASS_BANDWIDTHS = (3e12, 4.3e12)


# Element sizes of the types ONNX Runtime's profile names.
PROFILE_ITEMSIZE = {"float": 4, "float16": 2, "double": 8, "int64": 8, "int32": 4, "uint8": 1,
                    "int8": 1, "bool": 1}


def declared_itemsizes(model: onnx.ModelProto) -> dict[str, list[list[int]]]:
    """Node name -> the element sizes of its [inputs, outputs] as the graph declares them (ONNX
    type inference): what a provider that runs every node in its own type reads and writes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*g.input, *g.value_info, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})

    def size(name: str) -> int:
        return onnx.helper.tensor_dtype_to_np_dtype(types[name]).itemsize if name in types else 0
    return {n.name: [[size(i) for i in n.input], [size(o) for o in n.output]]
            for n in g.node if n.name}


def node_bytes(event: dict[str, Any], declared: Optional[dict[str, list[list[int]]]] = None,
               ) -> tuple[int, int]:
    """(bytes read, bytes written) of one node in ONNX Runtime's profile: its inputs (a Slice
    reads only the part it copies) and its outputs, sized as ``declared`` (when the node is
    there) says: ONNX Runtime's CPU provider runs an fp16 graph's arithmetic in fp32 behind
    casts it inserts, which a GPU provider does not."""
    args = event["args"]
    sizes = (declared or {}).get(event["name"].removesuffix("_kernel_time"))

    def total(listed: list[dict[str, list[int]]], own: Optional[list[int]]) -> int:
        out = 0
        for i, entry in enumerate(listed):
            (dtype, shape), = entry.items()
            item = own[i] if own and i < len(own) and own[i] else PROFILE_ITEMSIZE.get(dtype, 4)
            out += item * int(np.prod(shape, dtype=np.int64))
        return out
    written = total(args.get("output_type_shape", []), sizes[1] if sizes else None)
    if args.get("op_name") == "Slice":
        return written, written
    return total(args.get("input_type_shape", []), sizes[0] if sizes else None), written


def graph_traffic(bundle_dir: str, rgb: np.ndarray, device: str,
                  threads: Optional[int]) -> dict[str, Any]:
    """Bytes written by the graphs' node outputs for one image in the GPU configuration (every
    stage but connectivity a graph, the pre-pass too; ONNX Runtime's profile): the proxy for GPU
    memory traffic without fusion, and the time it implies at 4 TB/s. The pre-pass apart: its
    graph's bytes read and written against its CUDA kernels' (pamr_cuda.Plan.traffic, from
    their access pattern), and the times both imply at :data:`PREPASS_BANDWIDTHS`."""
    from .runtime.segmenter import Segmenter
    with tempfile.TemporaryDirectory() as tmp:
        seg = Segmenter.from_bundle(bundle_dir, device=device, threads=threads, profile_dir=tmp,
                                    stages={**GPU_PLAN, "prepass": "graph"})
        seg.segment(rgb, with_probs=False)
        per_graph, prepass = {}, (0, 0)
        manifest = seg.bundle.manifest
        declared = declared_itemsizes(stage_graphs.stage_model(
            "prepass", seg.params, seg.patch, seg.vocab.query_to_class, manifest.preprocess.norm,
            fp16=manifest.precision == "fp16"))
        for name, session in seg.sessions.items():
            with open(session.end_profiling(), encoding="utf-8") as f:
                events = [e for e in json.load(f) if e.get("cat") == "Node"
                          and e["name"].endswith("_kernel_time")]
            sizes = declared if name == "prepass" else None
            per_graph[name] = sum(node_bytes(e, sizes)[1] for e in events)
            if name == "prepass":
                prepass = tuple(sum(b) for b in zip(*(node_bytes(e, sizes) for e in events)))
    total = sum(per_graph.values())
    prepared = seg.prepare(rgb)
    plan = pamr_cuda.Plan(len(prepared.windows), len(seg.vocab.queries), prepared.window_hw,
                          tuple(s // seg.patch for s in prepared.window_hw), PAMR_ITERATIONS,
                          seg.patch, half=seg.bundle.manifest.precision == "fp16")
    kernels = plan.traffic()
    graph_bytes, kernel_bytes = sum(prepass), sum(kernels.values())
    return {"node_output_bytes": per_graph, "total_bytes": total,
            "implied_gpu_ms": 1e3 * total / GPU_BYTES_PER_S,
            "pamr_bytes": per_graph.get("prepass", 0),
            "pamr_share": per_graph.get("prepass", 0) / total if total else 0.0,
            "prepass": {
                "windows": plan.windows, "window_hw": list(plan.hw), "queries": plan.queries,
                "mask_dtype": np.dtype(plan.dtype).name,
                "graph_read_bytes": prepass[0], "graph_written_bytes": prepass[1],
                "kernel_bytes": kernels,
                "graph_ms": {f"{b / 1e12:g} TB/s": 1e3 * graph_bytes / b
                             for b in PREPASS_BANDWIDTHS},
                "kernel_ms": {f"{b / 1e12:g} TB/s": 1e3 * kernel_bytes / b
                              for b in PREPASS_BANDWIDTHS},
                "ratio": graph_bytes / kernel_bytes}}


def synthetic_video(rgb: np.ndarray, frames: int) -> Iterator[np.ndarray]:
    """``frames`` frames of the photo panning and zooming (a zoom cycle every 30 frames), made
    one at a time so a long run holds none of them."""
    h, w = rgb.shape[:2]
    for i in range(frames):
        phase = (i % 30) / 29
        zoom = 1.0 + 0.3 * phase
        ch, cw = int(h / zoom), int(w / zoom)
        y, x = int((h - ch) * phase), (w - cw) // 2
        yield cv2.resize(rgb[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_LINEAR)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def time_video(segmenter: Any, rgb: np.ndarray, frames: int,
               frames_per_batch: Optional[int]) -> dict[str, Any]:
    """Frames per second one frame after another vs the pipelined engine on the same frames,
    labels compared; the engine's resident memory sampled every 10 frames (flat = bounded)."""
    from .runtime.video import VideoEngine
    segmenter.segment(rgb, with_probs=False)
    start = time.perf_counter()
    one_by_one = [segmenter.segment(f, with_probs=False).labels
                  for f in synthetic_video(rgb, frames)]
    sequential = time.perf_counter() - start
    rss, same = [], True
    start = time.perf_counter()
    engine = VideoEngine(segmenter, frames_per_batch)
    for n, (i, _, result) in enumerate(engine.run(enumerate(synthetic_video(rgb, frames)))):
        same &= bool(np.array_equal(result.labels, one_by_one[i]))
        if n % 10 == 0:
            rss.append(round(current_rss_mb()))
    pipelined = time.perf_counter() - start
    return {"frames": frames, "frames_per_batch": engine.batch,
            "sequential_fps": frames / sequential, "pipelined_fps": frames / pipelined,
            "speedup": sequential / pipelined, "labels_identical": same,
            "rss_mb_every_10_frames": rss}


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def _size(value: Optional[str]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {value!r}: give HEIGHTxWIDTH, e.g. 336x448") from None
    if h < 1 or w < 1:
        raise UserError(f"--size {value!r}: both sides must be positive")
    return h, w


def _clients(value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in value.split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise UserError(f"--serve-clients {value!r}: give positive counts, e.g. 1,2,4")
    return levels


def benchmark(bundle_dir: str, image: Optional[str] = None,
              size: Optional[tuple[int, int]] = None, runs: int = 5, warmup: int = 1,
              device: str = "auto", threads: Optional[int] = None, reference: bool = True,
              reference_runs: int = 1, sweep: bool = False, video_frames: Optional[int] = None,
              frames_per_batch: Optional[int] = None, traffic: bool = False,
              stages: Optional[dict[str, str]] = None, gpu_plan: bool = False,
              floor: bool = False, against: Optional[str] = None,
              agreement_images: Sequence[str] = (), serve: Optional[dict[str, Any]] = None,
              ) -> dict[str, Any]:
    """``resclip-bench``: time a bundle per stage (and optionally the torch reference on the
    same image, 1/2/4/8 windows, a synthetic video) -> the report :func:`format_report` shows.

    ``image``: a file (default: the package's photo); ``size``: (H, W) to resize it to first.
    ``stages``: stage implementations over the device's defaults (resclip_deploy.stages).
    ``gpu_plan``: also run the GPU configuration's stages here on two images (the stage table's
    GPU column: every stage but connectivity a graph, the pre-pass the CUDA kernels where they
    can run) for its host time and host <-> device bytes.
    ``floor``: also time a plain ViT tower of the bundle's size on the same windows (needs
    torch to export it) and report the runtime / floor ratio.
    ``against``: an fp32 bundle (e.g. of an int8 one) whose labels on ONNX Runtime's CPU
    provider this run's are compared with, on ``agreement_images`` (default: the timed image).
    OpenVINO runs are always compared, with this bundle when ``against`` is not given.
    ``serve``: also run the bundle as ``resclip-serve`` and load it (serve_bench.py):
    ``{"clients": (1, 2, 4), "requests": per level, "pairs": alternated one-client runs,
    "ray_replicas": 0 or Ray Serve replicas to load next}``.
    """
    from .runtime.providers import OPENVINO_DEVICES
    from .runtime.segmenter import Segmenter
    if runs < 1 or warmup < 0 or reference_runs < 1:
        raise UserError("--runs and --reference-runs must be at least 1, --warmup at least 0")
    rgb = read_image(image) if image else bench_photo(size)
    if image and size:
        rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    segmenter = Segmenter.from_bundle(bundle_dir, device=device, threads=threads, stages=stages)
    p = segmenter.params
    x_hw = geometry.keep_ratio_size(*rgb.shape[:2], p.short_side, p.long_side_max)
    n_windows = len(geometry.window_boxes(*x_hw, p.mode, p.crop, p.stride))
    for _ in range(max(1, warmup)):
        segmenter.segment(rgb, with_probs=False)
    # the runtime's peak memory, read before the floor's session loads
    peak = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        floor_run, floor_info = (floor_tower(segmenter, bundle_dir, rgb, device, threads, tmp)
                                 if floor else (None, None))
        # runtime and floor alternate: a noisy machine's drift hits both alike
        ours = time_runtime(segmenter, rgb, runs, 0, floor_run)
    floor_run = None                # its session is not needed past here
    report: dict[str, Any] = {
        "bundle": os.path.abspath(bundle_dir), "image_hw": list(rgb.shape[:2]),
        "input_hw": list(x_hw), "windows": n_windows, "mode": p.mode,
        "queries": len(segmenter.vocab.queries),
        "precision": segmenter.bundle.manifest.precision,
        "providers": segmenter.providers, "stages": segmenter.plan, "runs": runs,
        "runtime": {"total_s": ours["total_s"], "stages_s": ours["stages_s"],
                    "peak_rss_mb": peak,
                    **{k: ours[k] for k in ("host_s", "graph_runs", "bytes_to_device",
                                            "bytes_to_host")}}}
    if floor:
        report["floor"] = {"floor_s": ours["alongside_s"], **floor_info,
                           "ratio": ours["total_s"] / ours["alongside_s"]}
    if against or device in OPENVINO_DEVICES:
        # after peak RSS was read: the baseline's graphs are not this run's memory
        report["agreement"] = labels_agreement(segmenter, against or bundle_dir, threads,
                                               [rgb] if not agreement_images else
                                               [read_image(p) for p in agreement_images],
                                               list(agreement_images) or ["timed image"])
    if gpu_plan:
        gpu = Segmenter.from_bundle(bundle_dir, device=device, threads=threads, stages=GPU_PLAN)
        # A fresh segmenter's first image (per-size merge matrices to make, the text bank of a
        # text-input bundle to upload), then the next of the same size (a stream, a service).
        first = time_runtime(gpu, rgb, 1, 0)
        steady = time_runtime(gpu, rgb, 1, 0)
        report["gpu_configuration"] = {
            "stages": gpu.plan, "first_image_host_s": first["host_s"],
            "labels_agreement": float((steady["labels"] == ours["labels"]).mean()),
            **{k: steady[k] for k in ("total_s", "host_s", "graph_runs", "bytes_to_device",
                                      "bytes_to_host")}}
        del gpu
    if sweep:
        report["sweep"] = window_sweep(segmenter, rgb, (1, 2, 4, 8), max(1, runs // 2))
    if reference:
        ref = time_reference(bundle_dir, rgb, reference_runs)
        report["reference"] = {k: ref[k] for k in ("total_s", "stages_s", "peak_rss_mb")}
        report["speedup"] = ref["total_s"] / ours["total_s"]
        report["labels_agreement"] = float((ref["labels"] == ours["labels"]).mean())
    if video_frames:
        report["video"] = time_video(segmenter, rgb, video_frames, frames_per_batch)
    if traffic:
        report["traffic"] = graph_traffic(bundle_dir, rgb, device, threads)
    if serve:
        from .serve_bench import serve_benchmark
        report["serve"] = serve_benchmark(bundle_dir, segmenter, rgb, device, threads,
                                          serve["clients"], serve["requests"], serve["pairs"],
                                          serve["ray_replicas"])
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as people read it: a stage table (runtime and reference side by side), the
    ratio and label agreement, the window sweep and the video line."""
    ref = report.get("reference")
    ours = report["runtime"]
    rows = [("stage", "runtime s", *(("reference s",) if ref else ()))]
    ref_stages = ref["stages_s"] if ref else {}
    for stage in TIMED_STAGES:
        ref_cell = f"{ref_stages[stage]:.3f}" if stage in ref_stages else ""
        rows.append((stage, f"{ours['stages_s'][stage]:.3f}", *((ref_cell,) if ref else ())))
    if "network" in ref_stages:     # the torch reference times its networks and SFR as one
        rows.append(("(reference: networks + SFR)", "", f"{ref_stages['network']:.3f}"))
    rows.append(("total", f"{ours['total_s']:.3f}", *((f"{ref['total_s']:.3f}",) if ref else ())))
    rows.append(("peak RSS MB", f"{ours['peak_rss_mb']:.0f}",
                 *((f"{ref['peak_rss_mb']:.0f}",) if ref else ())))
    h, w = report["image_hw"]
    lines = [f"{os.path.basename(report['bundle'])}: {h}x{w} image -> {report['input_hw'][0]}x"
             f"{report['input_hw'][1]} input, {report['windows']} window(s), "
             f"{report['queries']} queries, {report['precision']}, "
             f"{providers_line(report['providers'])}", table(rows)]
    lines.append(f"host time outside graph runs: {ours['host_s']:.3f} s per image; "
                 f"{ours['graph_runs']} graph runs; into / out of the graphs with these stages: "
                 f"{ours['bytes_to_device'] / 1e6:.2f} MB up, {ours['bytes_to_host'] / 1e6:.2f} "
                 "MB down")
    f = report.get("floor")
    if f:
        lines.append(f"floor (a plain ViT tower of this size on the same {f['windows']} "
                     f"window(s), ONNX Runtime): {f['floor_s']:.3f} s; runtime / floor: "
                     f"{f['ratio']:.2f}x")
    a = report.get("agreement")
    if a:
        per = ", ".join(f"{k} {100 * v:.2f} %" for k, v in a["images"].items())
        lines.append(f"labels equal to fp32 on ONNX Runtime's CPU provider "
                     f"({os.path.basename(a['baseline'])}): {100 * a['all']:.2f} % ({per})")
    g = report.get("gpu_configuration")
    if g:
        chosen = ", ".join(f"{k} {v}" for k, v in g["stages"].items() if v != "network")
        lines.append(f"GPU configuration ({chosen}; run here): "
                     f"host time outside graph runs {1e3 * g['host_s']:.1f} ms per image "
                     f"({1e3 * g['first_image_host_s']:.1f} ms for a first image of its size); "
                     f"{g['graph_runs']} graph runs; {g['bytes_to_device'] / 1e6:.2f} MB up, "
                     f"{g['bytes_to_host'] / 1e6:.2f} MB down; labels agree "
                     f"{100 * g['labels_agreement']:.3f} % with the run above")
    if ref:
        lines.append(f"reference / runtime: {report['speedup']:.1f}x faster; labels agree "
                     f"{100 * report['labels_agreement']:.2f} %")
    for row in report.get("sweep", []):
        lines.append(f"{row['windows']} window(s): {row['seconds']:.3f} s "
                     f"({row['seconds_per_window']:.3f} s/window)")
    t = report.get("traffic")
    if t:
        per = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in t["node_output_bytes"].items())
        lines.append(f"graph node outputs per image: {t['total_bytes'] / 1e6:.0f} MB ({per}); "
                     f"{t['implied_gpu_ms']:.2f} ms at 4 TB/s unfused; PAMR (pre-pass graph): "
                     f"{t['pamr_bytes'] / 1e6:.0f} MB, {100 * t['pamr_share']:.0f} %")
        lines.append(prepass_traffic_line(t["prepass"]))
    v = report.get("video")
    if v:
        lines.append(f"video, {v['frames']} frames: frame by frame {v['sequential_fps']:.2f} "
                     f"fps, pipelined {v['pipelined_fps']:.2f} fps ({v['speedup']:.2f}x); labels "
                     f"{'identical' if v['labels_identical'] else 'DIFFER'}; engine RSS every 10 "
                     f"frames (MB): {v['rss_mb_every_10_frames']}")
    if "serve" in report:
        from .serve_bench import format_serve
        lines += format_serve(report["serve"])
    return "\n".join(lines)


def prepass_traffic_line(p: dict[str, Any]) -> str:
    """The pre-pass's bytes per image, graph against kernels, and the times they imply."""
    graph = p["graph_read_bytes"] + p["graph_written_bytes"]
    kernels = sum(p["kernel_bytes"].values())

    def times(ms: dict[str, float]) -> str:
        return ", ".join(f"{v:.2f} ms at {k}" for k, v in ms.items())
    return (f"pre-pass per image ({p['windows']} x {p['window_hw'][0]}x{p['window_hw'][1]} "
            f"windows, {p['queries']} queries, {p['mask_dtype']} masks): graph "
            f"{graph / 1e9:.2f} GB (read {p['graph_read_bytes'] / 1e9:.2f}, written "
            f"{p['graph_written_bytes'] / 1e9:.2f}): {times(p['graph_ms'])}; CUDA kernels "
            f"{kernels / 1e9:.2f} GB: {times(p['kernel_ms'])}; {p['ratio']:.0f}x fewer bytes")


@click.command("resclip-bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False))
@click.option("--image", default=None, help="Image to time (default: the package's photo).")
@click.option("--size", default=None, help="Resize the image to HEIGHTxWIDTH first, e.g. 336x448.")
@click.option("--runs", type=int, default=5, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@device_option()
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime.")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Also time the torch reference on the same image (subprocess).")
@click.option("--reference-runs", type=int, default=1, show_default=True)
@click.option("--sweep", is_flag=True, help="Also time 1, 2, 4, 8 windows (linearity).")
@click.option("--video", "video_frames", type=int, default=None,
              help="Also time N frames of a synthetic pan/zoom video: pipelined engine vs "
                   "frame by frame.")
@click.option("--frames-per-batch", type=int, default=None,
              help="Video: frames per graph run (default: 1 on CPU, 4 on GPU).")
@click.option("--traffic", is_flag=True,
              help="Also profile one image: bytes written by graph node outputs (the GPU "
                   "memory traffic they imply, unfused), and the pre-pass's bytes as a graph "
                   "against its CUDA kernels'.")
@click.option("--stages", "stages_text", default=None,
              help="Stage implementations over the device's choice, e.g. prepass=graph or "
                   "all=numpy (stages: normalise, prepass, connectivity, sfr_matrix, output).")
@click.option("--gpu-plan", is_flag=True,
              help="Also run the GPU configuration's stages here on two images: its host time "
                   "outside graph runs and host <-> device bytes.")
@click.option("--floor/--no-floor", default=True, show_default=True,
              help="Also time a plain ViT tower of the bundle's size on the same windows "
                   "(exported with torch in a subprocess) and print runtime / floor.")
@click.option("--against", type=click.Path(file_okay=False), default=None,
              help="An fp32 bundle to compare labels with (ONNX Runtime, CPU), e.g. of an int8 "
                   "bundle; OpenVINO runs are compared with this bundle on ONNX Runtime anyway.")
@click.option("--agreement-image", "agreement_images", multiple=True,
              type=click.Path(dir_okay=False),
              help="Images for the label agreement (repeatable; default: the timed image).")
@click.option("--serve", is_flag=True,
              help="Also run the bundle as resclip-serve (uvicorn, its own process) and load it: "
                   "overhead over in-process segment(), requests/s, p50/p99, server memory.")
@click.option("--serve-clients", default="1,2,4", show_default=True,
              help="--serve: concurrent clients per level, comma-separated.")
@click.option("--serve-requests", type=click.IntRange(min=1), default=20, show_default=True,
              help="--serve: requests per level.")
@click.option("--serve-pairs", type=click.IntRange(min=1), default=5, show_default=True,
              help="--serve: in-process and one-client runs alternated for the overhead.")
@click.option("--serve-ray", "serve_ray", type=click.IntRange(min=0), default=0,
              show_default=True,
              help="--serve: then the same on Ray Serve with this many replicas (local Ray).")
@click.option("--json", "json_out", default=None, help="Write the results as JSON here.")
@user_errors
def bench_main(bundle_dir: str, image: Optional[str], size: Optional[str], runs: int,
               warmup: int, device: str, threads: Optional[int], reference: bool,
               reference_runs: int, sweep: bool, video_frames: Optional[int],
               frames_per_batch: Optional[int], traffic: bool, stages_text: Optional[str],
               gpu_plan: bool, floor: bool, against: Optional[str],
               agreement_images: tuple[str, ...], serve: bool, serve_clients: str,
               serve_requests: int, serve_pairs: int, serve_ray: int,
               json_out: Optional[str]) -> None:
    """Time a bundle per stage against the torch reference; report peak memory, host time
    outside graph runs and host <-> device bytes."""
    _setup_logging(quiet=True)
    report = benchmark(bundle_dir, image, _size(size), runs, warmup, device, threads, reference,
                       reference_runs, sweep, video_frames, frames_per_batch, traffic,
                       parse_stages(stages_text), gpu_plan, floor, against, agreement_images,
                       {"clients": _clients(serve_clients), "requests": serve_requests,
                        "pairs": serve_pairs, "ray_replicas": serve_ray} if serve else None)
    click.echo(format_report(report))
    if json_out:
        write_json(json_out, report)


def bench_entry() -> None:
    run_command(bench_main)
