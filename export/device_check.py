"""The device check: on a GPU machine, what the GPU providers compute and how fast.

Makes random ViT-B/16 weights there (no download), exports fp32 and fp16 bundles for ADE20K
(slide, 336x448: six windows; the default case) and, with ``--case voc20`` or ``--case all``,
VOC20 (whole image), checks CUDA (and TensorRT where its libraries load) against the CPU
provider's fp32 labels, and times images per stage and a synthetic video (frames/s after a
warm-up).

    python -P -m resclip_deploy.export.device_check [--cpu-only] [--tiny] [--case ade20k|voc20|all]
        [--frames 60] [--runs 5] [-o out.json]

First a preflight (export/device_preflight.py, in a process without torch) says in seconds what
ONNX Runtime finds. Output: JSON lines on stdout -- the preflight, one per finished run, the
whole report last; ``-o`` rewrites the report file (atomically) after every run, with
``"complete": false`` until the end, so a run stopped by a timeout still leaves its figures.
``--cpu-only`` skips the GPU providers (how the tests run it); ``--tiny`` uses a 4-block model
and two-class vocabularies (seconds instead of minutes). scripts/device_check.sh runs it on a
device machine with carried wheels (DEVELOPERS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import numpy as np
import onnxruntime as ort
import open_clip
import torch

import resclip_deploy
from resclip_deploy.bench import bench_photo, time_runtime, time_video
from resclip_deploy.params import preset_params
from resclip_deploy.runtime.providers import CUDA, TRT
from resclip_deploy.runtime.segmenter import Segmenter
from resclip_deploy.vocab import parse_class_list, preset_vocabulary

from .bundle_export import export_bundle
from .clip_loader import LoadedCLIP

# (name, preset, image size): the two configurations the GPU figures are reported for.
CASES = (("ade20k", "ade20k", (336, 448)), ("voc20", "voc20", None))
# ADE20K alone fits one device slot with its two exports; VOC20 adds two more.
DEFAULT_CASES = ("ade20k",)
# The preflight takes seconds; this only stops a hung CUDA initialisation from eating the slot.
PREFLIGHT_TIMEOUT_S = 30
TINY_CFG = {"embed_dim": 64,
            "vision_cfg": {"image_size": 224, "layers": 4, "width": 128, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1,
                         "layers": 2}, "quick_gelu": True}


def random_clip(tiny: bool) -> LoadedCLIP:
    """Random-weight CLIP made here: ViT-B/16 (QuickGELU, OpenAI's shape) or a tiny one."""
    torch.manual_seed(0)
    if tiny:
        model = open_clip.CLIP(**TINY_CFG)
        tokenizer = open_clip.SimpleTokenizer()
    else:
        model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
        tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    return LoadedCLIP(model.float().eval(), tokenizer,
                      {"model": "random ViT-B-16-quickgelu" if not tiny else "random tiny"})


def gpu_memory_mb() -> Optional[float]:
    """Used GPU memory as nvidia-smi reports it (ONNX Runtime's allocations included)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20)
        return float(out.stdout.split()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def devices(cpu_only: bool) -> list[str]:
    available = ort.get_available_providers()
    found = [] if cpu_only else [d for d, p in (("cuda", CUDA), ("tensorrt", TRT))
                                 if p in available]
    return ["cpu", *found]


def configurations(cpu_only: bool) -> list[tuple[str, Optional[dict[str, str]]]]:
    """(device, stages) to run: each provider as the stage table chooses (on a GPU the pre-pass
    kernels where numba-cuda finds the device), and on CUDA the pre-pass graph beside them."""
    out: list[tuple[str, Optional[dict[str, str]]]] = []
    for device in devices(cpu_only):
        out.append((device, None))
        if device == "cuda":
            out.append((device, {"prepass": "graph"}))
    return out


def check_one(bundle: str, device: str, rgb: np.ndarray, truth: Optional[Any], runs: int,
              frames: int, stages: Optional[dict[str, str]] = None,
              ) -> tuple[dict[str, Any], Optional[Any]]:
    """One bundle on one provider (``stages``: over the stage table's choice) -> (its entry,
    its segmentation of ``rgb``): labels and probabilities against the CPU fp32 ``truth``,
    seconds per stage, video frames/s, GPU memory."""
    head: dict[str, Any] = {"device": device, **({"stages_requested": stages} if stages else {})}
    try:
        seg = Segmenter.from_bundle(bundle, device=device, stages=stages)
    except Exception as e:  # a provider that does not start is a result, not a crash
        return {**head, "error": " ".join(str(e).split())[:600]}, None
    start = time.perf_counter()
    first = seg.segment(rgb)
    entry: dict[str, Any] = {**head, "providers": seg.providers,
                             "first_image_s": round(time.perf_counter() - start, 3)}
    timed = time_runtime(seg, rgb, runs, warmup=1)
    entry.update(image_s=round(timed["total_s"], 4), stages=seg.plan,
                 stages_s={k: round(v, 4) for k, v in timed["stages_s"].items()},
                 host_s=round(timed["host_s"], 4), bytes_to_device=timed["bytes_to_device"],
                 bytes_to_host=timed["bytes_to_host"])
    if truth is not None:
        entry["labels_vs_cpu_fp32"] = float((first.labels == truth.labels).mean())
        entry["probs_max_abs_diff_vs_cpu_fp32"] = float(np.abs(first.probs - truth.probs).max())
    if frames:
        video = time_video(seg, rgb, frames, None)
        entry["video"] = {k: video[k] for k in ("frames", "frames_per_batch", "sequential_fps",
                                                "pipelined_fps", "labels_identical")}
    entry["gpu_memory_mb"] = gpu_memory_mb() if device != "cpu" else None
    return entry, first


def check_fused(bundle: str, device: str, rgb: np.ndarray, truth: Any,
                runs: int) -> dict[str, Any]:
    """The one-graph chain (runtime/fused.py) on one provider, with its TensorRT profiles and
    engine cache: labels against CPU fp32 and seconds per image (host inputs included)."""
    from resclip_deploy.runtime import fused
    from resclip_deploy.runtime.providers import providers_of
    try:
        session, manifest = fused.fused_session(bundle, device)
        names = {i.name for i in session.get_inputs()}

        def once() -> np.ndarray:
            feeds = fused.fused_inputs(rgb, manifest.params, manifest)
            return session.run(["labels"], {k: v for k, v in feeds.items() if k in names})[0]
        labels = once()
        start = time.perf_counter()
        for _ in range(runs):
            once()
    except Exception as e:  # reported, as a provider that does not start
        return {"device": device, "error": " ".join(str(e).split())[:600]}
    return {"device": device, "providers": providers_of(session),
            "image_s": round((time.perf_counter() - start) / runs, 4),
            "labels_vs_cpu_fp32": float((labels[0] == truth.labels).mean())}


def selected_cases(names: Optional[list[str]]) -> list[tuple[str, str, Any]]:
    """``--case`` values (None: the default) -> the CASES to run, in CASES order."""
    wanted = set(names or DEFAULT_CASES)
    return [case for case in CASES if "all" in wanted or case[0] in wanted]


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` in one step: a reader (or a timeout) sees the old file or
    the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, partial = tempfile.mkstemp(prefix=".device-check-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise


def reporter(report: dict[str, Any], path: Optional[str]) -> Callable[[dict[str, Any]], None]:
    """-> ``save(event)``: prints the event as one JSON line and rewrites ``path`` (if any) with
    the whole report as it stands."""
    def save(event: dict[str, Any]) -> None:
        print(json.dumps(event, default=float), flush=True)
        if path:
            write_atomically(path, json.dumps(report, default=float) + "\n")
    return save


def run_preflight(workdir: str) -> dict[str, Any]:
    """export/device_preflight.py in a child process (without torch; see there), its JSON plus
    the end of what it logged (ONNX Runtime says there why a provider did not load)."""
    start = time.perf_counter()
    try:
        # cwd: not the repository root, whose source folder resclip_deploy/ lacks `export`
        child = subprocess.run([sys.executable, "-m", "resclip_deploy.export.device_preflight"],
                               capture_output=True, text=True, cwd=workdir,
                               timeout=PREFLIGHT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer in {PREFLIGHT_TIMEOUT_S} s"}
    lines = child.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if child.returncode == 0 and lines else None
    except json.JSONDecodeError:
        result = None
    if result is None:
        result = {"error": f"exit {child.returncode}"}
    # ONNX Runtime colours its log lines; the report keeps the text
    logged = re.sub(r"\x1b\[[0-9;]*m", "", child.stderr)
    result["stderr_tail"] = " ".join(logged.split())[-1500:]
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return result


def run(cpu_only: bool, tiny: bool, frames: int, runs: int, workdir: str,
        cases: list[tuple[str, str, Any]], report: dict[str, Any],
        save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every case into ``report["cases"]``, calling ``save`` after each export and each run."""
    clip = random_clip(tiny)
    for name, preset, size in cases:
        vocab = parse_class_list("cat|kitten,sofa") if tiny else preset_vocabulary(preset)
        rgb = bench_photo(size)
        truth = None
        for precision in ("fp32", "fp16"):
            folder = os.path.join(workdir, f"{name}-{precision}")
            start = time.perf_counter()
            manifest = export_bundle(clip, vocab, preset_params(preset), folder,
                                     precision=precision)
            case = {"case": name, "precision": precision, "image_hw": list(rgb.shape[:2]),
                    "export_s": round(time.perf_counter() - start, 1),
                    "verification": {k: manifest.verification[k] for k in
                                     ("labels_agreement", "probs_max_abs_diff")},
                    "runs": []}
            report["cases"].append(case)
            where = {"case": name, "precision": precision}
            save({**where, "export_s": case["export_s"]})
            for device, stages in configurations(cpu_only):
                # Video on the CPU only for the tiny model: ViT-B/16 frames take a second each.
                video = frames if device != "cpu" or tiny else 0
                entry, result = check_one(folder, device, rgb, truth, runs, video, stages)
                if truth is None:                   # CPU fp32 is the reference of the rest
                    truth = result
                case["runs"].append(entry)
                save({**where, "run": entry})
                if stages:
                    continue                        # the fused chain once per provider
                # The fused chain runs its pre-pass as graph ops: minutes on a CPU for ViT-B/16.
                if truth is not None and (device != "cpu" or tiny):
                    chain = check_fused(folder, device, rgb, truth, runs)
                    case.setdefault("fused", []).append(chain)
                    save({**where, "fused": chain})
    report["complete"] = True
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU providers")
    parser.add_argument("--tiny", action="store_true", help="a 4-block model, two classes")
    parser.add_argument("--frames", type=int, default=60, help="video frames per run (0: none)")
    parser.add_argument("--runs", type=int, default=5, help="timed images per run")
    parser.add_argument("--case", action="append", choices=[c[0] for c in CASES] + ["all"],
                        help="this case (repeatable; 'all': every case; default: "
                             + ", ".join(DEFAULT_CASES) + ")")
    parser.add_argument("-o", "--output", default=None,
                        help="the report as JSON, rewritten after every run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="resclip-device-check-") as workdir:
        preflight = run_preflight(workdir)
        report: dict[str, Any] = {"complete": False, "preflight": preflight,
                                  "package": os.path.dirname(resclip_deploy.__file__),
                                  "ort_version": ort.__version__,
                                  "available_providers": ort.get_available_providers(),
                                  "torch_cuda": torch.cuda.is_available(), "tiny": args.tiny,
                                  "cases": []}
        save = reporter(report, args.output)
        save({"preflight": preflight})
        try:
            run(args.cpu_only, args.tiny, args.frames, args.runs, workdir,
                selected_cases(args.case), report, save)
        except Exception as e:  # the report keeps what ran, and says where it stopped
            report["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:600]
            save({"error": report["error"]})
            raise
    save(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
