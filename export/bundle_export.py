"""resclip-export's work: a verified bundle, built in a temporary directory and renamed at the end.

Verification (before the bundle exists under its name): the ONNX checker on every graph, then
ONNX Runtime against the torch reference on a real photo — graph outputs at batch 1 and 2 (and a
second size in whole mode), and the whole pipeline's labels. A failure raises with the numbers;
the numbers that passed go into the manifest.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata, resources
from typing import Any, Callable, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import external_data_helper, helper, numpy_helper

from resclip_deploy import __version__
from resclip_deploy.bundle import (FULL_PRECISION_GRAPHS, OPSET, TEXT_BANK_FILE, GraphEntry,
                                   Manifest, ModelFacts, Preprocess, TensorInfo, TextEncoderSpec,
                                   file_entries, graph_layout, read_bundle, write_manifest)
from resclip_deploy.errors import UserError
from resclip_deploy.io import current_umask, read_image
from resclip_deploy.params import ResCLIPParams
from resclip_deploy.pipeline import prepare
from resclip_deploy.runtime.providers import create_session
from resclip_deploy.runtime.segmenter import Segmenter
from resclip_deploy.vocab import Vocabulary

from .clip_loader import LoadedCLIP
from .model import ResCLIPVisual
from .onnx_export import GRAPH_MODULES, example_inputs, export_graph
from .reference import ReferenceSegmenter
from .text import text_bank
from .text_export import export_text_encoder, text_encoder_entry

log = logging.getLogger("resclip_deploy")

# Bounds against the fp32 torch reference on the verification photo: (logits max abs diff,
# label agreement). int8 is opt-in and only reported: dynamic int8 trades agreement for speed.
THRESHOLDS: dict[str, Optional[tuple[float, float]]] = {
    "fp32": (1e-3, 0.995), "fp16": (5e-2, 0.98), "int8": None, "int8-static": None,
    "int8-weights": None}


class VerificationError(RuntimeError):
    """The exported graphs do not compute what the torch reference computes."""


def verification_photo() -> np.ndarray:
    """A real photo shipped with the package (CC0, scikit-image's 'chelsea')."""
    with resources.as_file(resources.files("resclip_deploy") / "data" / "chelsea.png") as path:
        return read_image(str(path))


def export_bundle(clip: LoadedCLIP, vocab: Vocabulary, params: ResCLIPParams, out_dir: str,
                  precision: str = "fp32", text_encoder: bool = False, force: bool = False,
                  progress: Optional[Callable[[int, int], None]] = None,
                  calibration: Optional[Sequence[np.ndarray]] = None) -> Manifest:
    """Write a verified bundle to ``out_dir``; returns its manifest.

    ``text_encoder``: also export the text tower and tokenizer; the text bank then becomes a
    graph input stored beside the graphs, so a runtime can swap vocabularies.
    ``calibration``: RGB photos for ``int8-static`` (default: the package's photo).
    """
    if precision not in THRESHOLDS:
        raise UserError(f"--precision {precision!r} is not known; choose one of "
                        f"{', '.join(THRESHOLDS)}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not force:
        raise UserError(f"{out_dir} exists; pass --force to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    try:
        manifest = _build(clip, vocab, params, tmp, precision, text_encoder, progress,
                          calibration)
        os.chmod(tmp, 0o777 & ~current_umask())     # mkdtemp makes 0700; a bundle is shared data
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first, then removed."""
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".old",
                               dir=os.path.dirname(out_dir))
        os.rename(out_dir, os.path.join(old, "bundle"))
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build(clip: LoadedCLIP, vocab: Vocabulary, params: ResCLIPParams, folder: str,
           precision: str, text_input: bool, progress,
           calibration: Optional[Sequence[np.ndarray]]) -> Manifest:
    text_spec = _export_text_encoder(clip, vocab, folder) if text_input else None
    started = time.perf_counter()
    bank = text_bank(clip.model, clip.tokenizer, vocab.queries, progress=progress)
    bank_seconds = time.perf_counter() - started
    net = ResCLIPVisual(clip.model.visual.float(), params).eval()
    # fp16: matrix products in fp16, LayerNorm/softmax/blends in fp32 (see model.py).
    export_net = ResCLIPVisual(copy.deepcopy(net.visual).half(), params).eval() \
        if precision == "fp16" else net
    text = torch.from_numpy(bank)
    layout = graph_layout(params, text_input)
    example_hw = (params.crop, params.crop) if params.mode == "slide" else (336, 448)
    graphs: dict[str, GraphEntry] = {}
    for name, io in layout.items():
        log.info("exporting %s graph", name)
        module = GRAPH_MODULES[name](export_net, io, None if text_input else text).eval()
        path = os.path.join(folder, f"{name}.onnx")
        export_graph(module, example_inputs(net, io, text, example_hw), path)
        if precision == "int8":
            quantize_int8(path)
        elif precision == "int8-weights" and name not in FULL_PRECISION_GRAPHS:
            quantize_int8_weights(path)
        onnx.checker.check_model(path, full_check=True)
        graphs[name] = _graph_entry(path)
    # Always kept: the bank the graphs were built with (an input of them with --text-encoder).
    np.save(os.path.join(folder, TEXT_BANK_FILE), bank)
    manifest = Manifest(
        source=clip.source, model=_model_facts(net), params=params, vocabulary=vocab,
        preprocess=Preprocess("keep-ratio-bilinear", params.short_side, params.long_side_max,
                              net.norm.mean, net.norm.std),
        precision=precision, text_bank="input" if text_input else "constant",
        text_encoder=text_spec, graphs=graphs, files=file_entries(folder),
        package_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=_versions(), timings_s={"text_bank": round(bank_seconds, 2)})
    if precision == "int8-static":
        # Calibration runs the fp32 graphs through the runtime: a provisional fp32 manifest.
        write_manifest(folder, manifest.replace(precision="fp32"))
        feeds = calibration_feeds(folder, calibration or [verification_photo()])
        for name in graphs:
            quantize_int8_static(os.path.join(folder, graphs[name].file), feeds[name])
            onnx.checker.check_model(os.path.join(folder, graphs[name].file), full_check=True)
            graphs[name] = _graph_entry(os.path.join(folder, graphs[name].file))
        manifest = manifest.replace(graphs=graphs, files=file_entries(folder))
    write_manifest(folder, manifest)
    verification = verify_bundle(folder, net, bank, vocab, params, precision)
    if text_input:
        verification["text_bank_max_abs_diff"] = _verify_text_bank(folder, bank, vocab)
    manifest = manifest.replace(verification=verification, timings_s={
        **manifest.timings_s, "total": round(time.perf_counter() - started, 2)})
    write_manifest(folder, manifest)
    return manifest


def _export_text_encoder(clip: LoadedCLIP, vocab: Vocabulary, folder: str) -> TextEncoderSpec:
    log.info("exporting text encoder and tokenizer")
    tokenizer, spec = text_encoder_entry(clip.tokenizer, clip.model, vocab.queries)
    tokenizer.save(os.path.join(folder, spec["tokenizer"]))
    path = os.path.join(folder, spec["graph"])
    export_text_encoder(clip.model, path)
    onnx.checker.check_model(path, full_check=True)
    spec["templates"] = tuple(spec["templates"])
    return TextEncoderSpec(**spec, entry=_graph_entry(path))


def _unverified_runtime(folder: str, **options: Any) -> Segmenter:
    """The bundle being exported on ONNX Runtime's CPU provider, read before its verification
    record is written (which every finished bundle needs)."""
    return Segmenter.from_bundle(read_bundle(folder, verified=False), device="cpu", **options)


def _verify_text_bank(folder: str, bank: np.ndarray, vocab: Vocabulary) -> float:
    """The bank rebuilt by the runtime (tokenizer file + ONNX text encoder) vs torch's."""
    runtime_bank = _unverified_runtime(folder, classes=vocab).text
    diff = float(np.abs(runtime_bank - bank).max())
    if not diff <= 1e-4:
        raise VerificationError(f"the ONNX text encoder's bank differs from torch's by {diff:.3g}"
                                " (limit 1e-4)")
    return diff


def quantize_int8(path: str) -> None:
    """Dynamic int8 (signed, per-channel weights; activations quantized at run time), in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    tmp = path + ".int8"
    quantize_dynamic(path, tmp, weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm"])
    os.replace(tmp, path)


def quantize_int8_weights(path: str) -> None:
    """Weight-only int8, in place: every matrix product's constant (in, out) weight becomes
    int8 with one symmetric scale per output column, restored by a DequantizeLinear in front of
    the MatMul; activations stay float. OpenVINO runs such a graph with integer matrix products
    (activations quantized per token at run time: runtime/openvino.py), ONNX Runtime in float."""
    model = onnx.load(path, load_external_data=False)
    # a ViT-H-sized graph keeps its weights beside it; in int8 they fit in the file again
    beside = {entry.value for t in model.graph.initializer for entry in t.external_data
              if entry.key == "location"}
    external_data_helper.load_external_data_for_model(model, os.path.dirname(path))
    weights = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2 \
                and weight.data_type == onnx.TensorProto.FLOAT:
            w = numpy_helper.to_array(weight)
            scale = np.abs(w).max(axis=0) / np.float32(127)
            scale[scale == 0] = 1                    # an all-zero column: any scale is exact
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            model.graph.initializer.remove(weight)
            model.graph.initializer.extend([
                numpy_helper.from_array(q, f"{weight.name}_int8"),
                numpy_helper.from_array(scale.astype(np.float32), f"{weight.name}_scale")])
            nodes.append(helper.make_node(
                "DequantizeLinear", [f"{weight.name}_int8", f"{weight.name}_scale"],
                [weight.name], name=f"{weight.name}_dequantize", axis=1))
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    tmp = path + ".int8"
    onnx.save(model, tmp)
    os.replace(tmp, path)
    for name in beside:
        os.remove(os.path.join(os.path.dirname(path), name))


def calibration_feeds(folder: str, photos: Sequence[np.ndarray]) -> dict[str, list[dict]]:
    """Every graph's inputs as the fp32 bundle in ``folder`` computes them on ``photos``: the
    encoder gets windows, the head what the encoder and the SFR step give it."""
    runtime = _unverified_runtime(folder)
    graphs = set(runtime.bundle.manifest.graphs)
    feeds: dict[str, list[dict]] = {name: [] for name in graphs}
    run_graph = runtime.run_graph

    def recording(graph: str, given: dict[str, Any], keep_on_device: tuple[str, ...] = ()):
        if graph in graphs:
            given = {**given, "text": runtime.text} if runtime.text is not None else given
            feeds[graph].append({a.name: np.array(given[a.name])
                                 for a in runtime.sessions[graph].get_inputs()})
        return run_graph(graph, given, keep_on_device)
    runtime.run_graph = recording
    for photo in photos:
        runtime.segment(photo)
    return feeds


def quantize_int8_static(path: str, feeds: list[dict[str, np.ndarray]]) -> None:
    """Static int8 in QDQ form, in place: per-channel int8 weights, uint8 activations with
    scales from the min/max of ``feeds`` (the calibration photos' inputs of this graph)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(feeds)

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            return next(self.batches, None)
    tmp = path + ".int8"
    quantize_static(path, tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=["MatMul", "Gemm"],
                    calibrate_method=CalibrationMethod.MinMax)
    os.replace(tmp, path)


def _graph_entry(path: str) -> GraphEntry:
    """The graph's file name, opset, and its inputs and outputs as ONNX Runtime reports them."""
    session = create_session(path, "cpu", None)

    def describe(args) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(a.name, a.type, tuple(a.shape)) for a in args)
    return GraphEntry(os.path.basename(path), OPSET, describe(session.get_inputs()),
                      describe(session.get_outputs()))


def _model_facts(net: ResCLIPVisual) -> ModelFacts:
    visual = net.visual
    return ModelFacts(patch=net.patch, grid=int(visual.grid_size[0]),
                      width=int(visual.conv1.out_channels),
                      depth=len(visual.transformer.resblocks),
                      heads=int(visual.transformer.resblocks[0].attn.num_heads),
                      embed_dim=int(visual.proj.shape[1]), rcs_blocks=tuple(net.rcs_blocks))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "open_clip_torch", "onnx", "onnxruntime-gpu", "onnxruntime", "numpy",
                 "opencv-python-headless"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def verify_bundle(folder: str, net: ResCLIPVisual, bank: np.ndarray, vocab: Vocabulary,
                  params: ResCLIPParams, precision: str) -> dict[str, Any]:
    """ONNX Runtime vs the fp32 torch reference on the verification photo.

    Raises VerificationError when the precision's thresholds are missed (int8: reported only).
    """
    photo = verification_photo()
    runtime = _unverified_runtime(folder)
    reference = ReferenceSegmenter(net.visual, bank, vocab, params)
    report: dict[str, Any] = {"photo": "chelsea.png (300x451)", "graphs": []}
    sizes = [params.short_side] if params.mode == "slide" else [params.short_side, 224]
    for short_side in sizes:
        windows = prepare(photo, params.replace(short_side=short_side), net.patch,
                          net.norm).windows
        for batch in (1, 2):
            chosen = windows[np.arange(batch) % len(windows)]
            report["graphs"].append(_compare_windows(runtime, reference, chosen))
    ours, theirs = runtime.segment(photo), reference.segment(photo)
    report["labels_agreement"] = float((ours.labels == theirs.labels).mean())
    report["probs_max_abs_diff"] = float(np.abs(ours.probs - theirs.probs).max())
    worst = max(g["logits_max_abs_diff"] for g in report["graphs"])
    agreement = report["labels_agreement"]
    limits = THRESHOLDS[precision]
    report["thresholds"] = None if limits is None else {"max_abs_diff": limits[0],
                                                        "labels_agreement": limits[1]}
    if not np.isfinite(worst) or (limits is not None and
                                  (worst > limits[0] or agreement < limits[1])):
        raise VerificationError(
            f"{precision} ONNX Runtime differs from the torch reference: logits max abs diff "
            f"{worst:.3g}, labels agree {100 * agreement:.3f} %"
            + ("" if limits is None else f" (limits {limits[0]}, {100 * limits[1]} %)"))
    log.info("verified %s against torch fp32: logits max abs diff %.2e, labels agree %.3f %%%s",
             precision, worst, 100 * agreement, " (int8: reported, not enforced)"
             if limits is None else "")
    return report


def _compare_windows(runtime: Segmenter, reference: ReferenceSegmenter,
                     windows: np.ndarray) -> dict[str, Any]:
    ref = reference.window_outputs(windows)
    logits, step = runtime.forward_windows(windows)
    entry = {"batch": int(windows.shape[0]), "size": list(windows.shape[2:]),
             "logits_max_abs_diff": float(np.abs(logits.reshape(ref.logits.shape)
                                                 - ref.logits).max())}
    if step is not None:
        entry["sfr_patch_label_agreement"] = float((step.grids == ref.patch_labels).mean())
    return entry
