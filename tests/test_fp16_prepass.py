"""The fp16 pre-pass graph computed as a GPU computes it: every fp16 op rounded to IEEE half.

ONNX Runtime's CPU provider folds the fp16 casts of ``prepass_graph(fp16=True)`` and runs its
PAMR loop in fp32, so a CPU session of that graph tests fp32 arithmetic. The CUDA provider
computes each fp16 Mul and Add in half precision and rounds after every op. Here the graph's fp16
part (every node that reads or writes float16) runs in onnx's ReferenceEvaluator on float16
arrays, one rounding per op; the fp32 parts before and after it run in ONNX Runtime.
"""

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops import op_add, op_mul
from onnx.utils import Extractor

from conftest import case_by_name, case_image
from resclip_deploy import stage_graphs
from resclip_deploy.io import read_image
from resclip_deploy.pamr import OFFSETS
from resclip_deploy.params import PAMR_DILATIONS, PAMR_ITERATIONS

F16 = TensorProto.FLOAT16


def _half_binary(torch_op):
    # numpy's float16 loops convert subnormal results in software: the real pre-pass has
    # ~30 % subnormal products (affinities near zero), which makes a full image take many
    # minutes. torch's CPU half kernels give the same bits, each op's exact result rounded once
    # (test_half_ops_round_once_per_op, over every finite half).
    def _run(self, a, b):
        if a.dtype != np.float16:
            return super(type(self), self)._run(a, b)
        return (torch_op(torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b)))
                .numpy(),)
    return _run


class Mul(op_mul.Mul):
    op_domain = ""
    _run = _half_binary(torch.mul)


class Add(op_add.Add):
    op_domain = ""
    _run = _half_binary(torch.add)


class HalfEvaluator:
    """A ReferenceEvaluator whose float16 Mul/Add round once per op (as numpy's and CUDA's do),
    counting the nodes that produced float16, by op type."""

    def __init__(self, model: onnx.ModelProto):
        self.evaluator = ReferenceEvaluator(model, new_ops=[Mul, Add])
        self.fp16_runs: Counter = Counter()
        for node in self.evaluator.rt_nodes_:
            node.run = self._counting(node.run, node.onnx_node.op_type)

    def _counting(self, run, op_type):
        def counted(*args, **kwargs):
            out = run(*args, **kwargs)
            if all(getattr(o, "dtype", None) == np.float16 for o in out):
                self.fp16_runs[op_type] += 1
            return out
        return counted

    def run(self, feeds, intermediate=False):
        return self.evaluator.run(None, feeds, intermediate=intermediate)


@dataclass
class Fp16Split:
    """A graph cut around its fp16 nodes: prefix (fp32, graph inputs -> ``region_inputs``),
    region (the nodes that read or write float16) and suffix (``region_outputs`` and the graph
    inputs -> graph outputs)."""

    prefix: onnx.ModelProto
    region: onnx.ModelProto
    suffix: onnx.ModelProto
    region_inputs: list
    region_outputs: list
    fp16_nodes: Counter       # region nodes typed float16 out, by op type


def split_at_fp16(model: onnx.ModelProto) -> Fp16Split:
    """Cut ``model`` where float16 starts and ends (tensor types from shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    infos = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}
    types = {name: v.type.tensor_type.elem_type for name, v in infos.items()}
    types.update({t.name: t.data_type for t in graph.initializer})
    region = [n for n in graph.node if F16 in (types.get(t) for t in [*n.input, *n.output])]
    inside = {id(n) for n in region}
    made = {t for n in region for t in n.output}
    initializers = {t.name: t for t in graph.initializer}
    needed = list(dict.fromkeys(t for n in region for t in n.input if t and t not in made))
    fed = [t for t in needed if t not in initializers]
    read_outside = {t for n in graph.node if id(n) not in inside for t in n.input}
    read_outside |= {o.name for o in graph.output}
    given = [t for t in dict.fromkeys(made) if t in read_outside]
    body = helper.make_graph(region, "fp16_region", [infos[t] for t in fed],
                             [infos[t] for t in given],
                             [initializers[t] for t in needed if t in initializers])
    region_model = helper.make_model(body, opset_imports=list(inferred.opset_import))
    region_model.ir_version = inferred.ir_version
    inputs = [i.name for i in graph.input]
    cut = Extractor(inferred)
    return Fp16Split(cut.extract_model(inputs, fed), region_model,
                     cut.extract_model(inputs + given, [o.name for o in graph.output]), fed, given,
                     Counter(n.op_type for n in region if types.get(n.output[0]) == F16))


def fp32_twin(region: onnx.ModelProto) -> onnx.ModelProto:
    """The region with its casts to float16 made casts to float32: the same ops in fp32."""
    twin = onnx.ModelProto()
    twin.CopyFrom(region)
    for node in twin.graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == F16:
                a.i = TensorProto.FLOAT
    return twin


def cpu_run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    return dict(zip(names, session.run(names, feeds)))


def _mask_input(feeds: dict, queries: int) -> str:
    masks = [name for name, v in feeds.items() if v.ndim == 4 and v.shape[1] == queries]
    assert len(masks) == 1, [(n, v.shape) for n, v in feeds.items()]
    return masks[0]


def _part(feeds: dict, mask: str, k: int, q0: int, q1: int) -> dict:
    """Window k's inputs, with queries q0:q1 of the masks; per-window inputs are (K, …, h, w)."""
    part = {n: v[k:k + 1] if v.ndim == 4 else v for n, v in feeds.items()}
    part[mask] = feeds[mask][k:k + 1, q0:q1]
    return part


def run_region_in_chunks(evaluator: HalfEvaluator, feeds: dict, queries: int, chunk: int):
    """The region over one window and ``chunk`` queries at a time. PAMR refines every window's
    and query's mask on its own (elementwise ops; pads and slices over h, w), so the bits are
    those of one run, and the evaluator, which keeps every intermediate, stays small and fast."""
    mask = _mask_input(feeds, queries)
    return np.concatenate([
        np.concatenate([evaluator.run(_part(feeds, mask, k, s, s + chunk))[0]
                        for s in range(0, queries, chunk)], axis=1)
        for k in range(feeds[mask].shape[0])])


# --- the emulation itself -----------------------------------------------------------------


def _pad_slice_mul_add(h, w):
    """x (1, 2, h, w), wt (1, 1, h, w) float16 -> wt · shift(edge_pad(x)) + x, as a PAMR term."""
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    starts = numpy_helper.from_array(np.array([0, 2], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([h, w + 2], np.int64), "ends")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [helper.make_node("Pad", ["x", "pads"], ["padded"], mode="edge"),
             helper.make_node("Slice", ["padded", "starts", "ends", "axes"], ["shifted"]),
             helper.make_node("Mul", ["wt", "shifted"], ["term"]),
             helper.make_node("Add", ["term", "x"], ["y"])]
    graph = helper.make_graph(nodes, "term", [
        helper.make_tensor_value_info("x", F16, [1, 2, h, w]),
        helper.make_tensor_value_info("wt", F16, [1, 1, h, w])],
        [helper.make_tensor_value_info("y", F16, [1, 2, h, w])], [pads, starts, ends, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _round_once(exact: np.ndarray) -> np.ndarray:
    return exact.astype(np.float16)


def test_half_ops_round_once_per_op():
    """Pad, Slice, Mul and Add on float16 stay float16 in the evaluator, numpy's ops and the
    torch-backed ones alike, and every Mul and Add is its exact result (float64 holds sums and
    products of halves exactly) rounded once to half, for every finite half, subnormals and
    ties included. The same terms computed exactly and rounded only at the end differ."""
    rng = np.random.default_rng(0)
    h, w = 248, 256
    finite = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = finite[np.isfinite(finite)]
    assert finite.size == h * w
    x = np.stack([rng.permutation(finite), -rng.permutation(finite)]).reshape(1, 2, h, w)
    # softmax affinities: many near zero, as in PAMR
    wt = np.exp(-rng.uniform(0, 20, (1, 1, h, w))).astype(np.float16)
    model = _pad_slice_mul_add(h, w)
    emulated = HalfEvaluator(model)
    with np.errstate(over="ignore"):      # sums past 65504 are inf, in half as on a GPU
        runs = {"torch": emulated.run({"x": x, "wt": wt}, intermediate=True),
                "numpy": ReferenceEvaluator(model).run(None, {"x": x, "wt": wt},
                                                       intermediate=True)}
        shifted = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)], mode="edge")[:, :, :h, 2:]
        term = _round_once(wt.astype(np.float64) * shifted.astype(np.float64))
        y = _round_once(term.astype(np.float64) + x.astype(np.float64))
        at_end = _round_once(wt.astype(np.float64) * shifted.astype(np.float64) + x)
    assert emulated.fp16_runs == Counter(Pad=1, Slice=1, Mul=1, Add=1)
    for name, steps in runs.items():
        expected = {"shifted": shifted, "term": term, "y": y}
        for tensor in ("padded", *expected):
            assert steps[tensor].dtype == np.float16, (name, tensor, steps[tensor].dtype)
        for tensor, value in expected.items():
            assert (steps[tensor].view(np.uint16) == value.view(np.uint16)).all(), (name, tensor)
    assert np.count_nonzero(term == 0) and np.count_nonzero((term != 0) & (abs(term) < 2.0 ** -14))
    assert (at_end.view(np.uint16) != y.view(np.uint16)).mean() > 0.01


# --- a real pre-pass ----------------------------------------------------------------------


def corner_windows(boxes: np.ndarray) -> list:
    """The windows at the four corners of a slide layout."""
    y1, x1 = boxes[:, 0], boxes[:, 2]
    return [i for i in range(len(boxes))
            if y1[i] in (y1.min(), y1.max()) and x1[i] in (x1.min(), x1.max())]


def test_fp16_prepass_as_a_gpu_rounds_it_agrees_with_fp32(bundle_for):
    """ADE20K on the cat photo: the four corner windows of its eight (224x224), all 150
    queries, 10 iterations, dilations 8 and 16, the pre-pass logits from the fixture bundle's
    encoder. The fp16 graph with per-op half rounding against the fp32 graph in ONNX Runtime.
    Four windows, not eight, to keep the test near a minute on two cores: the evaluator's half
    arithmetic costs several seconds per window."""
    from resclip_deploy.runtime.segmenter import Segmenter
    case = case_by_name("ade20k_chelsea")
    seg = Segmenter.from_bundle(str(bundle_for(case)), device="cpu")
    prepared = seg.prepare(read_image(str(case_image(case))))
    corners = corner_windows(prepared.boxes)
    assert len(corners) == 4
    enc = seg.encode(prepared.windows[corners])
    feeds = {"prepass_logits": seg.host(enc.prepass_logits), "windows": seg.host(enc.windows),
             "temp_thd": np.array(seg.params.temp_thd, dtype=np.float32)}
    k, q = feeds["prepass_logits"].shape[:2]
    assert q == case["num_queries"]

    def graph(fp16):
        return stage_graphs.stage_model("prepass", seg.params, seg.patch,
                                        seg.vocab.query_to_class, seg.norm, fp16=fp16)

    cut = split_at_fp16(graph(True))
    # the whole loop is in the fp16 part: per iteration one product per neighbour and dilation
    terms = len(OFFSETS) * len(PAMR_DILATIONS)
    assert cut.fp16_nodes["Mul"] >= terms * PAMR_ITERATIONS
    assert cut.fp16_nodes["Add"] >= (terms - 1) * PAMR_ITERATIONS
    assert len(cut.region_outputs) == 1, cut.region_outputs
    before = cpu_run(cut.prefix, feeds)
    region_feeds = {n: before[n] for n in cut.region_inputs}
    mask = _mask_input(region_feeds, q)
    emulated = HalfEvaluator(cut.region)
    chunk = 25
    mask16 = run_region_in_chunks(emulated, region_feeds, q, chunk)
    runs = k * -(-q // chunk)
    assert emulated.fp16_runs == Counter({op: n * runs for op, n in cut.fp16_nodes.items()})
    # chunking: one run over more queries gives the same bits
    whole = emulated.run(_part(region_feeds, mask, 0, 0, 2 * chunk))[0]
    np.testing.assert_array_equal(whole, mask16[:1, :2 * chunk])

    # the refined masks (first window) are not fp32 arithmetic, nor fp32 rounded once at the end
    mask32 = cpu_run(fp32_twin(cut.region), _part(region_feeds, mask, 0, 0, q))
    mask32 = mask32[cut.region_outputs[0]]
    off_fp32 = np.abs(mask16[:1] - mask32)
    off_once = (mask16[:1] != mask32.astype(np.float16).astype(np.float32)).mean()
    mask_msg = (f"masks: max |fp16 - fp32| {off_fp32.max():.3g} (|fp32| max "
                f"{np.abs(mask32).max():.3g}), {off_once:.1%} differ from fp32 rounded once")
    assert off_fp32.max() > 0 and off_once > 0.1, mask_msg

    half = cpu_run(cut.suffix, {**feeds, cut.region_outputs[0]: mask16})
    full = cpu_run(graph(False), feeds)
    patches = (half["patch_labels"] == full["patch_labels"]).mean()
    pixels = (half["prepass_argmax"] == full["prepass_argmax"]).mean()
    maxprob = np.abs(half["prepass_maxprob"] - full["prepass_maxprob"]).max()
    msg = (f"fp16 (per-op half) vs fp32: patch labels {patches:.4%} "
           f"({np.count_nonzero(half['patch_labels'] != full['patch_labels'])}/"
           f"{full['patch_labels'].size}), pixel argmax {pixels:.4%}, max-prob max diff "
           f"{maxprob:.3g}; {mask_msg}")
    print(msg)
    assert patches >= 0.995, msg
