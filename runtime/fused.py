"""The whole chain as one ONNX graph, connectivity inside: uint8 window crops in, labels out.

For TensorRT or Triton users who want no host hop at all. The bundle's own graphs and the stage
graphs (resclip_deploy.stage_graphs, connectivity as a graph: component squaring or the line
walk's index arithmetic) are joined with ``onnx.compose``; nothing is recomputed differently.
The host still prepares the inputs, which depend only on the image size (:func:`fused_inputs`):
the resized image's uint8 crops, the merge matrices and the two thresholds.

    python -m resclip_deploy.runtime.fused BUNDLE OUT.onnx [--connectivity reference]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Any, Optional

import numpy as np
import onnx
from onnx import compose

from resclip_deploy import stage_graphs
from resclip_deploy.bundle import Manifest, read_bundle
from resclip_deploy.errors import UserError
from resclip_deploy.geometry import merge_matrices
from resclip_deploy.params import ResCLIPParams
from resclip_deploy.pipeline import prepare

from .providers import check_device_for_precision, graph_session
from .segmenter import DEVICE_RESIDENT


def fused_model(bundle_dir: str, connectivity: Optional[str] = None) -> onnx.ModelProto:
    """One graph: frames (K, h, w, 3) uint8, rows, cols, temp_thd, prob_thd -> labels, probs
    (the output graph's). ``connectivity``: over the bundle's setting."""
    bundle = read_bundle(bundle_dir)
    m = bundle.manifest
    if m.text_input:
        raise UserError(f"bundle {bundle_dir} takes its text bank as an input; the fused graph "
                        "needs it inside: export the bundle without --text-input")
    params = m.params.replace(connectivity=connectivity) if connectivity else m.params
    graphs = {name: onnx.load(bundle.graph_file(name)) for name in m.graphs}
    ir = next(iter(graphs.values())).ir_version

    def stage(name: str) -> onnx.ModelProto:
        model = stage_graphs.stage_model(name, params, m.model.patch,
                                         m.vocabulary.query_to_class, m.preprocess.norm,
                                         fp16=m.precision == "fp16")
        model.ir_version = ir
        return model

    # Each graph joins under a prefix of its own (its names never meet the chain's); the
    # inputs and outputs left open get their plain names back at the end.
    def join(chain: onnx.ModelProto, model: onnx.ModelProto, prefix: str,
             links: list[tuple[str, str]], keep: list[str]) -> onnx.ModelProto:
        return compose.merge_models(chain, model, links,
                                    prefix2=f"{prefix}/", outputs=keep)

    if not params.sfr:
        chain = join(stage("normalise"), graphs["segmenter"], "segmenter",
                     [("windows", "pixels")], ["segmenter/logits"])
        chain = join(chain, stage("output"), "output", [("segmenter/logits", "logits")],
                     ["output/labels", "output/probs"])
        return _plain_names(chain)
    kept = [o.name for o in graphs["encoder"].graph.output if o.name in DEVICE_RESIDENT]
    enc = [f"encoder/{n}" for n in kept]
    chain = join(stage("normalise"), graphs["encoder"], "encoder", [("windows", "pixels")],
                 ["windows", *enc, "encoder/prepass_logits"])
    chain = join(chain, stage("prepass"), "prepass",
                 [("encoder/prepass_logits", "prepass_logits"), ("windows", "windows")],
                 [*enc, "prepass/patch_labels"])
    chain = join(chain, stage("connectivity"), "connectivity",
                 [("prepass/patch_labels", "patch_labels")],
                 [*enc, "prepass/patch_labels", "connectivity/connected"])
    chain = join(chain, stage("sfr_matrix"), "sfr_matrix",
                 [("prepass/patch_labels", "patch_labels"),
                  ("connectivity/connected", "connected")], [*enc, "sfr_matrix/sfr_bias"])
    chain = join(chain, graphs["head"], "head",
                 [*((e, n) for e, n in zip(enc, kept)), ("sfr_matrix/sfr_bias", "sfr_bias")],
                 ["head/logits"])
    chain = join(chain, stage("output"), "output", [("head/logits", "logits")],
                 ["output/labels", "output/probs"])
    return _plain_names(chain)


def _plain_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """'prepass/temp_thd' -> 'temp_thd' for the graph's inputs and outputs."""
    graph = model.graph
    renames = {v.name: v.name.rsplit("/", 1)[-1] for v in [*graph.input, *graph.output]}
    for v in [*graph.input, *graph.output]:
        v.name = renames[v.name]
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    return model


def fused_inputs(rgb: np.ndarray, params: ResCLIPParams, manifest: Manifest) -> dict[str, Any]:
    """The fused graph's inputs for one RGB uint8 image (the same for every image of a size,
    but for the crops)."""
    prepared = prepare(rgb, params, manifest.model.patch, None)
    grid = tuple(side // manifest.model.patch for side in prepared.window_hw)
    rows, cols = merge_matrices(prepared.boxes, prepared.input_hw, prepared.image_hw, grid)
    return {"frames": prepared.windows, "rows": rows, "cols": cols,
            "temp_thd": np.array(params.temp_thd, dtype=np.float32),
            "prob_thd": np.array(params.prob_thd, dtype=np.float32)}


def fused_session(bundle_dir: str, device: str, threads: Optional[int] = None,
                  cache_dir: Optional[str] = None, connectivity: Optional[str] = None,
                  ) -> tuple[Any, Manifest]:
    """(a session of the fused graph on ``device``, the bundle's manifest), with what GPU
    providers need as the segmenter's graphs get it: TensorRT profiles for its inputs, an
    engine cache keyed by the chain's checksum and options, fp16 engines for fp16 bundles."""
    manifest = read_bundle(bundle_dir).manifest
    device = check_device_for_precision(device, manifest.precision)
    model = fused_model(bundle_dir, connectivity).SerializeToString()
    return graph_session(model, device, threads, manifest, stage_graphs.input_names(model),
                         hashlib.sha256(model).hexdigest(), cache_dir,
                         len(manifest.vocabulary.queries), fallback=device == "auto"), manifest


def write_fused(bundle_dir: str, out: str, connectivity: Optional[str] = None) -> None:
    """Write the fused graph to ``out`` (weights beside it in ``out``.data above 1.5 GB), via a
    temporary name."""
    model = fused_model(bundle_dir, connectivity)
    tmp = f"{out}.partial"
    big = model.ByteSize() > 1_500_000_000
    onnx.save(model, tmp, save_as_external_data=big,
              location=os.path.basename(out) + ".data" if big else None)
    os.replace(tmp, out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resclip_deploy.runtime.fused",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("out")
    parser.add_argument("--connectivity", choices=("components", "reference"), default=None)
    args = parser.parse_args(argv)
    try:
        write_fused(args.bundle, args.out, args.connectivity)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
