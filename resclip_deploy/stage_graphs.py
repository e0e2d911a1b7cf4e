"""ONNX graphs of the stages around the network (docs/method.md §2, §5, §6), for GPU providers.

Each builder returns an ``onnx.ModelProto`` for one stage of :data:`resclip_deploy.stages.STAGES`;
the numpy functions in :mod:`pipeline`, :mod:`sfr`, :mod:`pamr` and :mod:`postprocess` are their
reference, and ``tests/test_stage_graphs.py`` holds every graph to them. The graphs carry no
weights: the runtime builds them when it loads a bundle (milliseconds), for the bundle's settings
and vocabulary. Batch, window and image sizes are dynamic.

Written for graph compilers (TensorRT, ORT's CUDA provider): PAMR's iteration is one edge pad then
16 same-shape slices, multiplies and adds (no (…, 16, h, w) stack); the patch vote and the synonym
max are compare/gather + reduce; the window merge and the output resize are two matrix products.
Every provider takes the graphs as they are: no ArgMax (TensorRT imports it as TopK, whose order
among equal values is unspecified, and cuDNN's reduction with indices does not document one), but
max, compare, select and min (:func:`_first_argmax`), which give numpy's first index on ties
whatever the kernel; label outputs are cast from float (TensorRT converts uint8 only to and from
float types); the row blur's Conv, whose weights are computed in the graph, names its kernel size
(TensorRT 10.1's parser reads it only from ``kernel_shape``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .geometry import PixelNorm
from .pamr import OFFSETS, _WITH_CENTRE
from .bundle import OPSET
from .params import PAMR_DILATIONS, PAMR_ITERATIONS, ResCLIPParams
from .sfr import torch_linspace01_f32

# IR 9 came with opset 18: readable by every ONNX Runtime and TensorRT parser that reads opset 18.
IR_VERSION = 9
F32, I64, BOOL, U8, I32 = (TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL,
                           TensorProto.UINT8, TensorProto.INT32)


class Builder:
    """A small helper over ``onnx.helper``: ``op`` adds a node and returns its output name(s)."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def _fresh(self, hint: str) -> str:
        # graph-qualified, so that stage graphs merged into one (runtime/fused.py) never collide
        self._count += 1
        return f"{self.name}.{hint}_{self._count}"

    def input(self, name: str, dtype: int, shape: Sequence) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def const(self, value, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self._fresh("const")
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def i64(self, *values: int) -> str:
        """A 1-D int64 constant (shapes, axes, starts)."""
        return self.const(np.array(values, dtype=np.int64))

    def f32(self, value: float) -> str:
        return self.const(np.float32(value))

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        names = [self._fresh(op_type.lower()) for _ in range(outputs)]
        # named as its first output: profiles (resclip-bench --traffic) then name the node
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=names[0], **attrs))
        return names[0] if outputs == 1 else names

    def dim(self, x: str, axis: int) -> str:
        """x.shape[axis] as a 1-element int64 tensor."""
        return self.op("Shape", x, start=axis, end=axis + 1)

    def output(self, value: str, name: str, dtype: int, shape: Sequence) -> None:
        self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="resclip-deploy")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


# --- shared pieces ----------------------------------------------------------------------------


def _add_chain(b: Builder, terms: Sequence[str]) -> str:
    """((t0 + t1) + t2) + …: the numpy path's summation order."""
    total = terms[0]
    for t in terms[1:]:
        total = b.op("Add", total, t)
    return total


def _shift(b: Builder, padded: str, pad: int, dy: int, dx: int, hw: str) -> str:
    """The (…, h, w) slice of an edge-padded (…, h + 2·pad, w + 2·pad) tensor at offset (dy, dx)."""
    starts = b.i64(pad + dy, pad + dx)
    return b.op("Slice", padded, starts, b.op("Add", starts, hw), b.i64(2, 3))


def _edge_pad(b: Builder, x: str, pad: int) -> str:
    return b.op("Pad", x, b.i64(0, 0, pad, pad, 0, 0, pad, pad), mode="edge")


def _grid_geometry(b: Builder, gh: str, gw: str) -> tuple[str, str, str, str]:
    """Row-major cell index -> (row, col) int64 (N,), and the (N, N) int64 Chebyshev distance."""
    n = b.op("Mul", gh, gw)
    idx = b.op("Range", b.const(np.int64(0)), b.op("Squeeze", n), b.const(np.int64(1)))
    r = b.op("Div", idx, gw)
    c = b.op("Mod", idx, gw)

    def pairwise_abs(v: str) -> str:
        return b.op("Abs", b.op("Sub", b.op("Unsqueeze", v, b.i64(1)),
                                b.op("Unsqueeze", v, b.i64(0))))

    return n, r, c, b.op("Max", pairwise_abs(r), pairwise_abs(c))


def _same_label(b: Builder, flat: str) -> str:
    """(K, N) labels -> (K, N, N) bool, label i == label j."""
    return b.op("Equal", b.op("Unsqueeze", flat, b.i64(2)), b.op("Unsqueeze", flat, b.i64(1)))


def _first_argmax(b: Builder, x: str, axis: int, index: str, peak: str | None = None) -> str:
    """The index of the largest value along ``axis`` (removed), as float32; the first of equal
    largest values, as numpy's argmax. ``index``: 0, 1, … float32 along ``axis``, broadcastable
    to ``x``; ``peak``: ReduceMax(x, axis) with the axis kept, where the caller has it.

    Max, compare, select and min are exact and their order does not matter, so every kernel
    gives the same answer (an ArgMax kernel breaks ties as it likes). Indices are exact in
    float32 below 2**24."""
    if peak is None:
        peak = b.op("ReduceMax", x, b.i64(axis))
    candidates = b.op("Where", b.op("Equal", x, peak), index, b.f32(2.0 ** 24))
    return b.op("ReduceMin", candidates, b.i64(axis), keepdims=0)


def _float_range(b: Builder, n: str) -> str:
    """0, 1, …, n − 1 as float32 (n: a 1-element int64 tensor)."""
    return b.op("Cast", b.op("Range", b.const(np.int64(0)), b.op("Squeeze", n),
                             b.const(np.int64(1))), to=F32)


# --- the stages -------------------------------------------------------------------------------


def normalise_graph(mean: Sequence[float], std: Sequence[float]) -> onnx.ModelProto:
    """frames (K, h, w, 3) uint8 -> windows (K, 3, h, w) float32, (x − mean) / std per channel.

    The host uploads uint8 crops (a quarter of the float bytes)."""
    b = Builder("normalise")
    x = b.op("Cast", b.input("frames", U8, ["K", "h", "w", 3]), to=F32)
    x = b.op("Div", b.op("Sub", x, b.const(np.float32(mean))), b.const(np.float32(std)))
    b.output(b.op("Transpose", x, perm=[0, 3, 1, 2]), "windows", F32, ["K", 3, "h", "w"])
    return b.model()


def prepass_graph(patch: int, logit_scale: float, dilations: Sequence[int],
                  iterations: int, fp16: bool = False) -> onnx.ModelProto:
    """SFR pre-pass (:func:`pipeline.prepass_probs`, :func:`sfr.pixel_labels`,
    :func:`sfr.patch_labels`).

    prepass_logits (K, Q, gh·gw), windows (K, 3, h, w), temp_thd () -> patch_labels (K, gh, gw)
    int64, prepass_argmax (K, h, w) int64, prepass_maxprob (K, h, w) float32. ``fp16``: the
    PAMR iterations in half precision (fp16 bundles; half the memory traffic), the rest fp32.
    Labels are float32 inside (exact integers; half the bytes of int64) and int64 at the outputs.
    """
    b = Builder("prepass")
    logits = b.input("prepass_logits", F32, ["K", "Q", "N"])
    windows = b.input("windows", F32, ["K", 3, "h", "w"])
    temp_thd = b.input("temp_thd", F32, [])
    k, q = b.dim(logits, 0), b.dim(logits, 1)
    h, w = b.dim(windows, 2), b.dim(windows, 3)
    hw = b.op("Concat", h, w, axis=0)
    p = b.i64(patch)
    gh, gw = b.op("Div", h, p), b.op("Div", w, p)
    grid = b.op("Reshape", logits, b.op("Concat", k, q, gh, gw, axis=0))
    mask = b.op("Resize", grid, "", "", b.op("Concat", k, q, h, w, axis=0), mode="linear",
                coordinate_transformation_mode="half_pixel")
    weights = _pamr_weights(b, windows, hw, tuple(dilations))
    pad = max(dilations)
    shifts = [(dy * d, dx * d) for d in dilations for dy, dx in OFFSETS]
    if fp16:
        mask = b.op("Cast", mask, to=TensorProto.FLOAT16)
        weights = [b.op("Cast", wk, to=TensorProto.FLOAT16) for wk in weights]
    for _ in range(iterations):
        padded = _edge_pad(b, mask, pad)
        mask = _add_chain(b, [b.op("Mul", wk, _shift(b, padded, pad, dy, dx, hw))
                              for wk, (dy, dx) in zip(weights, shifts)])
    if fp16:
        mask = b.op("Cast", mask, to=F32)
    z = b.op("Mul", mask, b.f32(logit_scale))
    peak = b.op("ReduceMax", z, b.i64(1))
    queries = _float_range(b, q)
    best = _first_argmax(b, z, 1, b.op("Unsqueeze", queries, b.i64(1, 2)), peak)
    total = b.op("ReduceSum", b.op("Exp", b.op("Sub", z, peak)), b.i64(1), keepdims=0)
    maxprob = b.op("Div", b.f32(1.0), total)
    labels = b.op("Where", b.op("Less", maxprob, temp_thd), b.f32(0.0), best)
    b.output(b.op("Cast", _patch_vote(b, labels, k, gh, gw, queries, patch), to=I64),
             "patch_labels", I64, ["K", "gh", "gw"])
    b.output(b.op("Cast", best, to=I64), "prepass_argmax", I64, ["K", "h", "w"])
    b.output(maxprob, "prepass_maxprob", F32, ["K", "h", "w"])
    return b.model()


def _pamr_weights(b: Builder, image: str, hw: str, dilations: tuple[int, ...]) -> list[str]:
    """(K, 3, h, w) guide -> 16 (K, 1, h, w) softmax affinities (:func:`pamr.affinities`)."""
    pad = max(dilations)
    padded = _edge_pad(b, image, pad)
    samples = [_shift(b, padded, pad, dy * d, dx * d, hw)
               for d in dilations for dy, dx in _WITH_CENTRE]
    mean = b.op("Div", _add_chain(b, samples), b.f32(len(samples)))
    var = b.op("Div", _add_chain(b, [b.op("Mul", d, d) for d in
                                     (b.op("Sub", s, mean) for s in samples)]),
               b.f32(len(samples) - 1))
    scale = b.op("Add", b.f32(1e-8), b.op("Mul", b.f32(0.1), b.op("Sqrt", var)))
    channels = b.f32(3)
    aff = []
    for d in dilations:
        for dy, dx in OFFSETS:
            diff = b.op("Div", b.op("Neg", b.op("Abs", b.op(
                "Sub", image, _shift(b, padded, pad, dy * d, dx * d, hw)))), scale)
            aff.append(b.op("Div", b.op("ReduceSum", diff, b.i64(1)), channels))
    peak = b.op("Max", *aff)
    exps = [b.op("Exp", b.op("Sub", a, peak)) for a in aff]
    total = _add_chain(b, exps)
    return [b.op("Div", e, total) for e in exps]


def _patch_vote(b: Builder, labels: str, k: str, gh: str, gw: str, queries: str,
                patch: int) -> str:
    """(K, h, w) float32 pixel labels -> (K, gh, gw) float32 most frequent label per patch,
    smallest on ties (real ones: counts are integers). ``queries``: 0 … Q − 1 float32."""
    p = b.i64(patch)
    cropped = b.op("Slice", labels, b.i64(0, 0), b.op("Concat", b.op("Mul", gh, p),
                                                      b.op("Mul", gw, p), axis=0), b.i64(1, 2))
    cells = b.op("Reshape", cropped, b.op("Concat", k, gh, p, gw, p, axis=0))
    cells = b.op("Transpose", cells, perm=[0, 1, 3, 2, 4])
    cells = b.op("Reshape", cells, b.op("Concat", k, gh, gw, b.i64(patch * patch), b.i64(1),
                                        axis=0))
    counts = b.op("ReduceSum", b.op("Cast", b.op("Equal", cells, queries), to=F32), b.i64(3),
                  keepdims=0)
    return _first_argmax(b, counts, 3, queries)


def connectivity_graph(connectivity: str, max_side: int) -> onnx.ModelProto:
    """patch_labels (K, gh, gw) -> connected (K, N, N) bool (:func:`sfr.component_connectivity`,
    :func:`sfr.reference_connectivity`); grids up to ``max_side`` cells a side.

    components: the reflexive 8-neighbour same-label adjacency squared ⌈log2(N_max − 1)⌉ times
    (paths double each time; counts stay exact integers in float32). reference: the authors' line
    walk, all sample points at once, t from a table of torch's linspace for every D ≤ max_side.
    """
    b = Builder(f"connectivity_{connectivity}")
    grid = b.input("patch_labels", I64, ["K", "gh", "gw"])
    k, gh, gw = b.dim(grid, 0), b.dim(grid, 1), b.dim(grid, 2)
    n, r, c, cheb = _grid_geometry(b, gh, gw)
    flat = b.op("Reshape", grid, b.op("Concat", k, n, axis=0))
    if connectivity == "components":
        near = b.op("LessOrEqual", cheb, b.const(np.int64(1)))
        reach = b.op("Cast", b.op("And", _same_label(b, flat), near), to=F32)
        cells = max_side * max_side
        for _ in range(max(1, math.ceil(math.log2(max(cells - 1, 2))))):
            reach = b.op("Cast", b.op("Greater", b.op("MatMul", reach, reach), b.f32(0)), to=F32)
        b.output(b.op("Cast", reach, to=BOOL), "connected", BOOL, ["K", "N", "N"])
        return b.model()
    if connectivity != "reference":
        raise ValueError(f"unknown connectivity {connectivity!r}")
    table = np.zeros((max_side, max_side), dtype=np.float32)
    for big_d in range(max_side):
        table[big_d, :big_d + 1] = torch_linspace01_f32(big_d + 1)
    big_d = b.op("Sub", b.op("Max", gh, gw), b.i64(1))
    steps = b.op("Add", big_d, b.i64(1))
    t = b.op("Slice", b.op("Gather", b.const(table), b.op("Squeeze", big_d), axis=0),
             b.i64(0), steps, b.i64(0))
    t = b.op("Unsqueeze", t, b.i64(1, 2))                                # (S, 1, 1)
    one_minus = b.op("Sub", b.f32(1.0), t)

    def walk(v: str) -> str:
        v = b.op("Cast", v, to=F32)
        start, end = b.op("Unsqueeze", v, b.i64(1)), b.op("Unsqueeze", v, b.i64(0))
        point = b.op("Add", b.op("Mul", start, one_minus), b.op("Mul", end, t))
        return b.op("Cast", b.op("Round", point), to=I64)                 # (S, N, N)

    points = b.op("Add", b.op("Mul", walk(r), gw), walk(c))
    samples = b.op("Gather", flat, points, axis=1)                        # (K, S, N, N)
    start_label = b.op("Unsqueeze", flat, b.i64(1, 3))                    # (K, 1, N, 1)
    k_index = b.op("Range", b.const(np.int64(0)), b.op("Squeeze", steps), b.const(np.int64(1)))
    beyond = b.op("Greater", b.op("Unsqueeze", k_index, b.i64(1, 2)), cheb)    # (S, N, N)
    ok = b.op("Or", b.op("Equal", samples, start_label), beyond)
    valid = b.op("ReduceMin", b.op("Cast", ok, to=F32), b.i64(1), keepdims=0)
    b.output(b.op("Cast", valid, to=BOOL), "connected", BOOL, ["K", "N", "N"])
    return b.model()


def sfr_matrix_graph(gaussian_std: float) -> onnx.ModelProto:
    """patch_labels (K, gh, gw), connected (K, N, N) bool -> sfr_matrix (K, T, T) S and
    sfr_bias (K, T, T) fp16-rounded S / max S (:func:`sfr.sfr_matrix`, :func:`sfr.sfr_bias`).

    """
    b = Builder("sfr_matrix")
    grid = b.input("patch_labels", I64, ["K", "gh", "gw"])
    connected = b.input("connected", BOOL, ["K", "N", "N"])
    k, gh, gw = b.dim(grid, 0), b.dim(grid, 1), b.dim(grid, 2)
    n, _, _, cheb = _grid_geometry(b, gh, gw)
    flat = b.op("Reshape", grid, b.op("Concat", k, n, axis=0))
    m = b.op("Cast", _same_label(b, flat), to=F32)
    # D = max(h, w) − 1; a 1x1 grid (D = 0) has only its own, connected, pair.
    big_d = b.op("Cast", b.op("Max", b.op("Sub", b.op("Max", gh, gw), b.i64(1)), b.i64(1)),
                 to=F32)
    decay = b.op("Exp", b.op("Div", b.op("Neg", b.op("Cast", cheb, to=F32)), big_d))
    m = b.op("Where", connected, m, b.op("Mul", m, decay))
    blurred = b.op("Relu", _row_blur(b, m, k, n, gaussian_std))
    row_sum = b.op("Add", b.op("ReduceSum", blurred, b.i64(2)), b.f32(1e-8))
    s = b.op("Pad", b.op("Div", blurred, row_sum), b.i64(0, 1, 1, 0, 0, 0), b.f32(0.0))
    ratio = b.op("Div", s, b.op("ReduceMax", s, b.i64(1, 2)))
    bias = b.op("Cast", b.op("Cast", ratio, to=TensorProto.FLOAT16), to=F32)
    b.output(s, "sfr_matrix", F32, ["K", "T", "T"])
    b.output(bias, "sfr_bias", F32, ["K", "T", "T"])
    return b.model()


def _row_blur(b: Builder, m: str, k: str, n: str, std: float) -> str:
    """(K, N, N) -> each row correlated with :func:`sfr.gaussian_kernel_1d` (zero padding).

    One Conv over the K·N rows with a fixed int(6·std + 1)-tap kernel (made odd): a grid with
    fewer cells has a narrower kernel, min(N, taps) made odd, whose missing taps are zeros.
    """
    taps = int(6 * std + 1)
    taps = taps if taps % 2 == 1 else taps + 1
    size = b.op("Min", n, b.i64(int(6 * std + 1)))
    size = b.op("Sub", b.op("Add", size, b.i64(1)), b.op("Mod", size, b.i64(2)))
    radius = b.op("Cast", b.op("Div", size, b.i64(2)), to=F32)
    x = np.arange(taps, dtype=np.float32) - np.float32(taps // 2)
    g = np.exp(-(x ** 2) / np.float32(2 * std ** 2)).astype(np.float32)
    g = b.op("Where", b.op("LessOrEqual", b.const(np.abs(x)), radius), b.const(g), b.f32(0.0))
    g = b.op("Div", g, b.op("ReduceSum", g, keepdims=0))
    rows = b.op("Reshape", m, b.op("Concat", b.op("Mul", k, n), b.i64(1), n, axis=0))
    # kernel_shape although the weights' shape says it: TensorRT 10.1 reads only the attribute
    out = b.op("Conv", rows, b.op("Reshape", g, b.i64(1, 1, taps)), kernel_shape=[taps],
               pads=[taps // 2, taps // 2])
    return b.op("Reshape", out, b.op("Concat", k, n, n, axis=0))


def output_graph(query_to_class: Sequence[int], logit_scale: float, labels_dtype: int = U8,
                 probs: bool = True, threshold: bool = True) -> onnx.ModelProto:
    """Window merge and output (:func:`geometry.merge_windows`, :func:`postprocess.finalize`)
    for F images of one size (a video batch; F = 1 for an image).

    logits (F·K, Q, gh·gw) with K = ny·nx windows per image, row-major; rows (H0, ny, gh), cols
    (W0, nx, gw) from :func:`geometry.merge_matrices`; prob_thd () -> labels (F, H0, W0), and
    probs (F, C, H0, W0) float32 when ``probs``. The merge, the division by the window count
    and the resize to (H0, W0) are linear and separable in y and x: canvas_q = rows · G_q · colsᵀ.
    Labels only: no softmax unless ``threshold`` (then only its denominator; without it the
    graph has no prob_thd input), as :func:`postprocess.finalize` skips it. Labels are float32
    until the output's cast (exact below 2**24 classes).
    """
    q2c = np.asarray(query_to_class, dtype=np.int64)
    b = Builder("output")
    logits = b.input("logits", F32, ["FK", "Q", "N"])
    rows = b.input("rows", F32, ["H0", "ny", "gh"])
    cols = b.input("cols", F32, ["W0", "nx", "gw"])
    softmax = probs or threshold
    prob_thd = b.input("prob_thd", F32, []) if softmax else None
    ny, gh, nx, gw = b.dim(rows, 1), b.dim(rows, 2), b.dim(cols, 1), b.dim(cols, 2)
    q = b.dim(logits, 1)
    # queries last, so that every reduction over them reads contiguous memory
    grids = b.op("Reshape", logits, b.op("Concat", b.i64(-1), ny, nx, q, gh, gw, axis=0))
    grids = b.op("Transpose", grids, perm=[0, 1, 4, 2, 5, 3])          # (F, ny, gh, nx, gw, Q)
    grids = b.op("Reshape", grids, b.op("Concat", b.i64(-1), b.op("Mul", ny, gh),
                                        b.op("Mul", b.op("Mul", nx, gw), q), axis=0))
    by_rows = b.op("MatMul", b.op("Reshape", rows, b.i64(0, -1)), grids)   # (F, H0, nx·gw·Q)
    by_rows = b.op("Reshape", by_rows, b.op("Concat", b.i64(0, 0), b.op("Mul", nx, gw), q,
                                            axis=0))
    z = b.op("MatMul", b.op("Reshape", cols, b.i64(0, -1)), by_rows)       # (F, H0, W0, Q)
    z = b.op("Mul", z, b.f32(logit_scale))
    classes = b.const(np.arange(int(q2c.max()) + 1, dtype=np.float32))
    if not softmax:
        labels = _first_argmax(b, _class_max(b, z, q2c), 3, classes)
        b.output(b.op("Cast", labels, to=labels_dtype), "labels", labels_dtype, ["F", "H0", "W0"])
        return b.model()
    e = b.op("Exp", b.op("Sub", z, b.op("ReduceMax", z, b.i64(3))))
    total = b.op("ReduceSum", e, b.i64(3), keepdims=0)
    cls = _class_max(b, e, q2c)
    peak = b.op("ReduceMax", cls, b.i64(3))
    labels = _first_argmax(b, cls, 3, classes, peak)
    low = b.op("Less", b.op("Div", b.op("Squeeze", peak, b.i64(3)), total), prob_thd)
    labels = b.op("Where", low, b.f32(0.0), labels)
    b.output(b.op("Cast", labels, to=labels_dtype), "labels", labels_dtype, ["F", "H0", "W0"])
    if probs:
        p = b.op("Div", cls, b.op("Unsqueeze", total, b.i64(3)))
        p = b.op("Div", p, b.op("ReduceSum", p, b.i64(3)))
        b.output(b.op("Transpose", p, perm=[0, 3, 1, 2]), "probs", F32, ["F", "C", "H0", "W0"])
    return b.model()


def input_names(model: bytes) -> tuple[str, ...]:
    """The graph inputs of a serialised stage graph."""
    return tuple(i.name for i in onnx.load_from_string(model).graph.input)


def labels_dtype(num_classes: int) -> tuple[int, type]:
    """The smallest label type that holds every class: uint8 up to 256 classes."""
    return (U8, np.uint8) if num_classes <= 256 else (I32, np.int32)


def _class_max(b: Builder, e: str, q2c: np.ndarray) -> str:
    """(F, H0, W0, Q) -> (F, H0, W0, C), the max over each class's synonyms (queries grouped by
    class, as a Vocabulary's are). No synonyms: nothing to do."""
    classes = int(q2c.max()) + 1
    if classes == len(q2c):
        return e
    members = [np.flatnonzero(q2c == c) for c in range(classes)]
    widest = max(len(m) for m in members)
    # each class's queries, padded with its first (a repeat does not change a max)
    table = np.array([np.r_[m, np.full(widest - len(m), m[0])] for m in members], dtype=np.int64)
    return b.op("ReduceMax", b.op("Gather", e, b.const(table), axis=3), b.i64(4), keepdims=0)


def stage_model(stage: str, params: ResCLIPParams, patch: int, query_to_class: Sequence[int],
                norm: PixelNorm, fp16: bool = False, probs: bool = True) -> onnx.ModelProto:
    """The graph of one stage of :data:`stages.STAGES` for a bundle's settings and vocabulary
    (``probs``: the output stage's variant with probabilities; without, labels only)."""
    if stage == "normalise":
        return normalise_graph(norm.mean, norm.std)
    if stage == "prepass":
        return prepass_graph(patch, params.logit_scale, PAMR_DILATIONS, PAMR_ITERATIONS, fp16)
    if stage == "connectivity":
        side = params.crop if params.mode == "slide" else params.long_side_max
        return connectivity_graph(params.connectivity, max(1, side // patch))
    if stage == "sfr_matrix":
        return sfr_matrix_graph(params.gaussian_std)
    if stage == "output":
        return output_graph(query_to_class, params.logit_scale,
                            labels_dtype(int(max(query_to_class)) + 1)[0], probs=probs,
                            threshold=probs or params.prob_thd > 0)
    raise ValueError(f"stage {stage!r} has no graph")
