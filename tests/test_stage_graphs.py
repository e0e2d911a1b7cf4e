"""The stage graphs (resclip_deploy.stage_graphs) against the numpy stages they replace on a GPU,
the stage table, and the graph path against the numpy path through whole bundles."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import CASES, case_image
from resclip_deploy import geometry, pipeline, sfr, stage_graphs, stages
from resclip_deploy.errors import UserError
from resclip_deploy.params import CONNECTIVITIES, PAMR_DILATIONS, PAMR_ITERATIONS, ResCLIPParams


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def blobs(rng, k, q, gh, gw, scale=0.08):
    """Smooth, structured logits (a few blobs per query), as a pre-pass produces."""
    yy, xx = np.mgrid[0:gh, 0:gw]
    out = np.zeros((k, q, gh * gw), dtype=np.float32)
    for i in range(k):
        for j in range(q):
            cy, cx = rng.uniform(0, gh), rng.uniform(0, gw)
            bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(1, 4) ** 2))
            out[i, j] = (scale * bump + 0.01 * rng.standard_normal((gh, gw))).ravel()
    return out


def test_normalise_graph_is_bit_exact():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)
    norm = geometry.CLIP_PIXEL_NORM
    p = ResCLIPParams()
    numpy_windows = pipeline.prepare(rgb, p, 16, norm).windows
    frames = pipeline.prepare(rgb, p, 16, None).windows
    assert frames.dtype == np.uint8 and frames.shape == (8, 224, 224, 3)
    out, = session(stage_graphs.normalise_graph(norm.mean, norm.std)).run(None, {"frames": frames})
    np.testing.assert_array_equal(out, numpy_windows)


@pytest.mark.parametrize("hw", [(96, 112), (70, 90)], ids=["patch-multiple", "ragged"])
def test_prepass_graph_equals_numpy(hw):
    rng = np.random.default_rng(1)
    k, q, patch = 2, 5, 16
    h, w = hw
    logits = blobs(rng, k, q, h // patch, w // patch)
    windows = rng.standard_normal((k, 3, h, w)).astype(np.float32)
    p = ResCLIPParams(temp_thd=0.3)
    argmax, maxprob, grids = pipeline.prepass_step(logits, windows, p, patch)
    graph = session(stage_graphs.prepass_graph(patch, p.logit_scale, PAMR_DILATIONS,
                                               PAMR_ITERATIONS))
    g_grids, g_argmax, g_maxprob = graph.run(None, {
        "prepass_logits": logits, "windows": windows,
        "temp_thd": np.array(p.temp_thd, dtype=np.float32)})
    assert (g_argmax == argmax).mean() >= 0.9999
    np.testing.assert_allclose(g_maxprob, maxprob, rtol=0, atol=1e-5)
    assert (g_grids == grids).mean() >= 0.9999
    # the threshold is an input: a higher one empties more pixels, as in numpy
    _, _, grids_hi = pipeline.prepass_step(logits, windows, p.replace(temp_thd=0.9), patch)
    g_hi = graph.run(["patch_labels"], {"prepass_logits": logits, "windows": windows,
                                        "temp_thd": np.array(0.9, dtype=np.float32)})[0]
    assert (g_hi == grids_hi).mean() >= 0.9999 and (grids_hi == 0).sum() > (grids == 0).sum()


def test_prepass_graph_fp16_pamr_stays_close():
    rng = np.random.default_rng(2)
    logits = blobs(rng, 1, 4, 6, 6)
    windows = rng.standard_normal((1, 3, 96, 96)).astype(np.float32)
    p = ResCLIPParams()
    argmax, _, _ = pipeline.prepass_step(logits, windows, p, 16)
    model = stage_graphs.prepass_graph(16, p.logit_scale, PAMR_DILATIONS, PAMR_ITERATIONS,
                                       fp16=True)
    assert any(n.op_type == "Cast" and n.attribute[0].i == 10 for n in model.graph.node)
    out = session(model).run(["prepass_argmax"], {
        "prepass_logits": logits, "windows": windows, "temp_thd": np.array(0.25, np.float32)})[0]
    assert (out == argmax).mean() >= 0.99


def test_pamr_iteration_is_fusable():
    """One edge pad per iteration, then same-shape slices, multiplies and adds: no stacked
    (…, 16, h, w) tensor anywhere (every Concat joins shape vectors, never masks)."""
    model = stage_graphs.prepass_graph(16, 40.0, PAMR_DILATIONS, PAMR_ITERATIONS)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Pad") == PAMR_ITERATIONS + 1            # + the guide image's
    # 16 neighbours per iteration; 18 samples (centre included) + 16 neighbours for the
    # affinities; one crop for the patch vote
    assert ops.count("Slice") == 16 * PAMR_ITERATIONS + 18 + 16 + 1
    assert "Stack" not in ops and "Einsum" not in ops
    shape_values = {i.name for i in model.graph.initializer if i.data_type == 7}   # int64
    for n in model.graph.node:
        if n.op_type == "Shape" or (n.op_type in ("Div", "Mul", "Concat", "Add")
                                    and all(i in shape_values for i in n.input)):
            shape_values.update(n.output)
    concats = [n for n in model.graph.node if n.op_type == "Concat"]
    assert concats and all(all(i in shape_values for i in n.input) for n in concats)


def random_grid(rng, shape, labels):
    return rng.integers(0, labels, shape).astype(np.int64)


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
def test_connectivity_graph_is_exact(connectivity):
    rng = np.random.default_rng(3)
    graph = session(stage_graphs.connectivity_graph(connectivity, 16))
    for shape in [(1, 1), (1, 7), (3, 5), (7, 13), (14, 14)]:
        for labels in (2, 3):
            grids = np.stack([random_grid(rng, shape, labels) for _ in range(2)])
            out, = graph.run(None, {"patch_labels": grids})
            want = np.stack([sfr.connectivity_mask(g, connectivity) for g in grids])
            np.testing.assert_array_equal(out, want, err_msg=f"{shape} {labels}")


def test_component_squarings_cover_a_snake():
    """The longest path a grid allows (a snake through every cell) is still found."""
    grid = np.ones((7, 7), dtype=np.int64)
    grid[1::4, :6] = 0
    grid[3::4, 1:] = 0
    out, = session(stage_graphs.connectivity_graph("components", 7)).run(
        None, {"patch_labels": grid[None]})
    np.testing.assert_array_equal(out[0], sfr.component_connectivity(grid))
    ones = np.flatnonzero(grid.ravel() == 1)
    assert out[0][ones[0], ones[-1]]


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
def test_sfr_matrix_graph_equals_numpy(connectivity):
    rng = np.random.default_rng(4)
    graph = session(stage_graphs.sfr_matrix_graph(5.0))
    for shape in [(1, 1), (2, 3), (14, 14), (21, 28)]:
        grids = np.stack([random_grid(rng, shape, 3) for _ in range(2)])
        connected = np.stack([sfr.connectivity_mask(g, connectivity) for g in grids])
        s, bias = graph.run(None, {"patch_labels": grids, "connected": connected})
        want = np.stack([sfr.sfr_matrix(g, connectivity, 5.0) for g in grids])
        np.testing.assert_allclose(s, want, rtol=0, atol=1e-6)
        want_bias = np.stack([sfr.sfr_bias(m) for m in want])
        # fp16 rounding of S / max S: a 1e-7 difference may cross a rounding boundary (1 ulp)
        ulp = np.abs(np.spacing(want_bias.astype(np.float16)).astype(np.float32))
        assert np.all(np.abs(bias - want_bias) <= ulp)
        assert (bias != want_bias).mean() <= 1e-3


OUTPUT_CASES = [  # mode, network input (H, W), original (H0, W0), query -> class
    ("slide", (336, 448), (512, 683), [0, 0, 1, 2, 2, 2, 3]),
    ("slide", (336, 448), (336, 448), list(range(9))),
    ("slide", (224, 300), (160, 214), [0, 1, 1]),
    ("whole", (336, 500), (300, 450), [0, 1, 1, 2]),
]


@pytest.mark.parametrize("mode,input_hw,out_hw,q2c", OUTPUT_CASES)
def test_output_graph_equals_numpy(mode, input_hw, out_hw, q2c):
    rng = np.random.default_rng(5)
    p = ResCLIPParams(mode=mode, prob_thd=0.4)
    boxes = geometry.window_boxes(*input_hw, p.mode, p.crop, p.stride)
    h, w = int(boxes[0, 1] - boxes[0, 0]), int(boxes[0, 3] - boxes[0, 2])
    gh, gw = h // 16, w // 16
    logits = blobs(rng, len(boxes), len(q2c), gh, gw)
    prepared = pipeline.Prepared(np.zeros((len(boxes), 3, h, w), np.float32), boxes, input_hw,
                                 out_hw)
    names = tuple(f"c{i}" for i in range(max(q2c) + 1))
    vocab = type("V", (), {"query_to_class": q2c, "class_names": names})
    want = pipeline.output_numpy(prepared, logits, p, 16, vocab, True, pipeline.Timings())
    rows, cols = geometry.merge_matrices(boxes, input_hw, out_hw, (gh, gw))
    graph = session(stage_graphs.output_graph(q2c, p.logit_scale))
    labels, probs = graph.run(None, {"logits": logits, "rows": rows, "cols": cols,
                                     "prob_thd": np.array(p.prob_thd, np.float32)})
    assert labels.dtype == np.uint8 and labels.shape == (1, *out_hw)
    assert (labels[0] == want.labels).mean() >= 0.9999
    assert (want.labels == 0).mean() > 0.01          # the threshold did something
    np.testing.assert_allclose(probs[0], want.probs, rtol=0, atol=1e-5)
    # a batch of frames of one size: each frame as alone
    two, _ = graph.run(None, {"logits": np.concatenate([logits, logits[::-1]]), "rows": rows,
                              "cols": cols, "prob_thd": np.array(p.prob_thd, np.float32)})
    np.testing.assert_array_equal(two[0], labels[0])
    alone, _ = graph.run(None, {"logits": logits[::-1].copy(), "rows": rows, "cols": cols,
                                "prob_thd": np.array(p.prob_thd, np.float32)})
    np.testing.assert_array_equal(two[1], alone[0])
    # labels only: with the threshold (softmax denominator only), and without it (no softmax)
    thd_only = session(stage_graphs.output_graph(q2c, p.logit_scale, probs=False))
    only, = thd_only.run(None, {"logits": logits, "rows": rows, "cols": cols,
                                "prob_thd": np.array(p.prob_thd, np.float32)})
    np.testing.assert_array_equal(only, labels)
    plain = pipeline.output_numpy(prepared, logits, p.replace(prob_thd=0.0), 16, vocab, False,
                            pipeline.Timings())
    no_thd = session(stage_graphs.output_graph(q2c, p.logit_scale, probs=False, threshold=False))
    bare, = no_thd.run(None, {"logits": logits, "rows": rows, "cols": cols})
    assert (bare[0] == plain.labels).mean() >= 0.9999


# --- ties: the answer must not depend on how a kernel breaks them -----------------------------


def ties_the_other_way(model):
    """A copy of ``model`` whose ArgMax nodes take the last of equal values: what a kernel with
    another tie order would give (TensorRT's TopK and cuDNN leave the order unspecified)."""
    flipped = onnx.ModelProto()
    flipped.CopyFrom(model)
    for node in flipped.graph.node:
        if node.op_type == "ArgMax":
            kept = [a for a in node.attribute if a.name != "select_last_index"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("select_last_index", 1)])
    return flipped


def run_both_tie_orders(model, feeds):
    """The graph's outputs, checked equal under either tie order."""
    as_is = session(model).run(None, feeds)
    other = session(ties_the_other_way(model)).run(None, feeds)
    for a, b in zip(as_is, other):
        np.testing.assert_array_equal(a, b)
    return as_is


def test_prepass_argmax_takes_the_first_of_equal_queries():
    rng = np.random.default_rng(7)
    logits = blobs(rng, 2, 4, 5, 6)
    logits[:, 2] = logits[:, 1]          # query 2 ties with query 1 wherever they lead
    windows = rng.standard_normal((2, 3, 80, 96)).astype(np.float32)
    p = ResCLIPParams(temp_thd=0.0)
    argmax, _, grids = pipeline.prepass_step(logits, windows, p, 16)
    assert (argmax == 1).mean() > 0.05 and not (argmax == 2).any()
    graph = stage_graphs.prepass_graph(16, p.logit_scale, PAMR_DILATIONS, PAMR_ITERATIONS)
    g_grids, g_argmax, _ = run_both_tie_orders(graph, {
        "prepass_logits": logits, "windows": windows, "temp_thd": np.array(0.0, np.float32)})
    assert not (g_argmax == 2).any() and not (g_grids == 2).any()
    assert (g_argmax == argmax).mean() >= 0.9999
    np.testing.assert_array_equal(g_grids, grids)


def test_patch_vote_takes_the_smaller_of_equal_counts():
    """Queries 1 and 2 cross at the centre of patch column 2 of a symmetric window: 8 pixel
    columns each, 128 pixels to 128 in both of its patches."""
    gh, gw = 2, 5
    ramp = np.float32(0.1) * (2 - np.arange(gw, dtype=np.float32))
    logits = np.zeros((1, 3, gh, gw), np.float32)
    logits[0, 1] = 0.5 + ramp
    logits[0, 2] = 0.5 - ramp
    logits = logits.reshape(1, 3, gh * gw)
    windows = np.zeros((1, 3, 16 * gh, 16 * gw), np.float32)
    p = ResCLIPParams(temp_thd=0.0)
    argmax, maxprob, grids = pipeline.prepass_step(logits, windows, p, 16)
    labels = sfr.pixel_labels(argmax, maxprob, p.temp_thd)[0]
    for r in range(gh):
        cell = labels[16 * r:16 * (r + 1), 32:48]
        assert (cell == 1).sum() == (cell == 2).sum() == 128
    assert (grids[0, :, 2] == 1).all()
    graph = stage_graphs.prepass_graph(16, p.logit_scale, PAMR_DILATIONS, PAMR_ITERATIONS)
    g_grids, g_argmax, _ = run_both_tie_orders(graph, {
        "prepass_logits": logits, "windows": windows, "temp_thd": np.array(0.0, np.float32)})
    np.testing.assert_array_equal(g_argmax, argmax)
    np.testing.assert_array_equal(g_grids, grids)


@pytest.mark.parametrize("variant", ["probs", "threshold", "bare"])
@pytest.mark.parametrize("dtype", [stage_graphs.U8, stage_graphs.I32], ids=["uint8", "int32"])
def test_output_labels_take_the_first_of_equal_classes(variant, dtype):
    """Class 2's one query is a copy of query 1, one of class 1's two: class 2 never beats
    class 1 and equals it wherever query 1 leads."""
    rng = np.random.default_rng(8)
    q2c = [0, 1, 1, 2, 3]
    p = ResCLIPParams(prob_thd=0.0 if variant == "bare" else 0.3)
    boxes = geometry.window_boxes(336, 448, "slide", p.crop, p.stride)
    logits = blobs(rng, len(boxes), len(q2c), 14, 14)
    logits[:, 3] = logits[:, 1]
    prepared = pipeline.Prepared(np.zeros((len(boxes), 3, 224, 224), np.float32), boxes,
                                 (336, 448), (300, 400))
    vocab = type("V", (), {"query_to_class": q2c, "class_names": ("a", "b", "c", "d")})
    scored = pipeline.output_numpy(prepared, logits, p, 16, vocab, True, pipeline.Timings())
    assert ((scored.labels == 1) & (scored.probs[1] == scored.probs[2])).mean() > 0.05
    want = scored.labels if variant == "probs" else pipeline.output_numpy(
        prepared, logits, p, 16, vocab, False, pipeline.Timings()).labels
    assert not (want == 2).any()
    rows, cols = geometry.merge_matrices(boxes, (336, 448), (300, 400), (14, 14))
    graph = stage_graphs.output_graph(q2c, p.logit_scale, dtype, probs=variant == "probs",
                                      threshold=variant != "bare")
    feeds = {"logits": logits, "rows": rows, "cols": cols}
    if variant != "bare":
        feeds["prob_thd"] = np.array(p.prob_thd, np.float32)
    labels = run_both_tie_orders(graph, feeds)[0]
    assert labels.dtype == (np.uint8 if dtype == stage_graphs.U8 else np.int32)
    assert not (labels == 2).any()
    assert (labels[0] == want).mean() >= 0.9999


def test_labels_type_fits_the_classes():
    assert stage_graphs.labels_dtype(256)[1] is np.uint8
    assert stage_graphs.labels_dtype(257)[1] is np.int32


def test_merge_matrices_reproduce_merge_and_resize():
    rng = np.random.default_rng(6)
    boxes = geometry.window_boxes(336, 448, "slide", 224, 112)
    grids = rng.standard_normal((len(boxes), 14, 14, 1)).astype(np.float32)
    canvas = geometry.merge_windows(grids, boxes, (336, 448))
    want = geometry.resize_bilinear_hwc(canvas, (500, 700))[:, :, 0]
    rows, cols = geometry.merge_matrices(boxes, (336, 448), (500, 700), (14, 14))
    tiled = grids[:, :, :, 0].reshape(2, 3, 14, 14).transpose(0, 2, 1, 3).reshape(28, 42)
    # OpenCV's float resize carries ~1e-5 relative error of its own; values here are ~N(0, 1)
    np.testing.assert_allclose(rows.reshape(500, -1) @ tiled @ cols.reshape(700, -1).T, want,
                               rtol=0, atol=1e-4)


# --- the stage table -------------------------------------------------------------------------


def test_stage_table_declares_every_graph_io():
    p = ResCLIPParams()
    for stage in stages.STAGES:
        if stages.GRAPH not in stage.implementations:
            continue
        model = stage_graphs.stage_model(stage.name, p, 16, [0, 0, 1], geometry.CLIP_PIXEL_NORM)
        assert set(stage_graphs.input_names(model.SerializeToString())) <= set(stage.inputs)
        assert [o.name for o in model.graph.output] == list(stage.outputs)
    labels_only = stage_graphs.stage_model("output", p, 16, [0, 0, 1], geometry.CLIP_PIXEL_NORM,
                                           probs=False)
    assert [o.name for o in labels_only.graph.output] == ["labels"]
    assert "Exp" not in [n.op_type for n in labels_only.graph.node]       # prob_thd 0: no softmax
    assert stage_graphs.input_names(labels_only.SerializeToString()) == ("logits", "rows", "cols")


def test_stage_choices_per_device():
    cpu, gpu = stages.choose("cpu", True), stages.choose("cuda", True, skip=("kernel",))
    assert cpu["prepass"] == "numpy" and gpu["prepass"] == "graph"
    assert cpu["connectivity"] == gpu["connectivity"] == "numpy"
    assert all(gpu[s] == "graph" for s in ("normalise", "sfr_matrix", "output"))
    assert "segmenter" not in cpu and "encoder" in cpu
    plain = stages.choose("cuda", False)
    assert set(plain) == {"normalise", "segmenter", "output"}
    assert stages.choose("cpu", True, {"all": "graph"})["connectivity"] == "graph"
    assert stages.choose("cpu", True, {"output": "numpy"})["output"] == "numpy"
    with pytest.raises(UserError, match="not a stage of this bundle"):
        stages.choose("cpu", False, {"prepass": "graph"})
    with pytest.raises(UserError, match="choose numpy or graph or kernel"):
        stages.choose("cpu", True, {"prepass": "cuda"})
    with pytest.raises(UserError, match="choose network"):
        stages.choose("cpu", True, {"encoder": "numpy"})
    assert stages.parse_stages("prepass=graph, output=numpy") == {"prepass": "graph",
                                                                  "output": "numpy"}
    with pytest.raises(UserError, match="stage=implementation"):
        stages.parse_stages("prepass")


# --- through bundles: the graph path against the numpy path ----------------------------------

ALL_NUMPY = {"all": "numpy"}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_graph_path_equals_numpy_path(case, bundle_for):
    """Every fixture case, both connectivities: labels >= 99.99 % equal, probabilities within
    1e-4. The pre-pass does not depend on the connectivity: its graph runs with the first."""
    from resclip_deploy.io import read_image
    from resclip_deploy.runtime.segmenter import Segmenter
    bundle = str(bundle_for(case))
    rgb = read_image(str(case_image(case)))
    for i, connectivity in enumerate(CONNECTIVITIES):
        graphs = {"all": "graph"} if i == 0 else {"all": "graph", "prepass": "numpy"}
        if not case["sfr"]["on"]:
            graphs = {"all": "graph"}
        want = Segmenter.from_bundle(bundle, "cpu", stages=ALL_NUMPY,
                                     connectivity=connectivity).segment(rgb)
        seg = Segmenter.from_bundle(bundle, "cpu", stages=graphs, connectivity=connectivity)
        got = seg.segment(rgb)
        assert set(seg.sessions) >= {"normalise", "output"}
        assert got.labels.dtype == np.int32 and got.labels.shape == want.labels.shape
        assert (got.labels == want.labels).mean() >= 0.9999, connectivity
        np.testing.assert_allclose(got.probs, want.probs, rtol=0, atol=1e-4)


# --- the whole chain as one graph --------------------------------------------------------------

FUSED_CASES = ["voc20_astronaut", "voc21_chelsea_sclip", "voc20_chelsea_clip"]


@pytest.mark.parametrize("name", FUSED_CASES)
def test_fused_graph_equals_numpy_path(name, bundle_for, tmp_path):
    """Whole mode, slide mode and no SFR; both connectivities inside the graph."""
    from conftest import case_by_name
    from resclip_deploy.bundle import read_bundle
    from resclip_deploy.io import read_image
    from resclip_deploy.runtime import fused
    from resclip_deploy.runtime.segmenter import Segmenter
    case = case_by_name(name)
    bundle = str(bundle_for(case))
    rgb = read_image(str(case_image(case)))
    manifest = read_bundle(bundle).manifest
    for connectivity in CONNECTIVITIES if case["sfr"]["on"] else ("reference",):
        out = tmp_path / f"fused_{connectivity}.onnx"
        assert fused.main([bundle, str(out), "--connectivity", connectivity]) == 0
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in sess.get_inputs()}
        assert {"frames", "rows", "cols", "prob_thd"} <= wanted
        feeds = fused.fused_inputs(rgb, manifest.params.replace(connectivity=connectivity),
                                   manifest)
        labels, probs = sess.run(None, {k: v for k, v in feeds.items() if k in wanted})
        want = Segmenter.from_bundle(bundle, "cpu", stages=ALL_NUMPY,
                                     connectivity=connectivity).segment(rgb)
        assert (labels[0] == want.labels).mean() >= 0.9999, connectivity
        np.testing.assert_allclose(probs[0], want.probs, rtol=0, atol=1e-4)


def test_fused_graph_refuses_a_text_input_bundle(tiny_bundle, tmp_path, capsys):
    from resclip_deploy.runtime import fused
    out = tmp_path / "f.onnx"
    assert fused.main([str(tiny_bundle), str(out)]) == 2
    assert "takes its text bank as an input" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "f.onnx.partial").exists()


def test_prepass_prefers_the_cuda_kernels_on_a_gpu_and_falls_back_to_the_graph():
    """The GPU column's pre-pass is the kernel where it can run, else the graph; a request for
    the kernel where it cannot run is refused with the reason; prepass=graph forces the graph."""
    assert stages.choose("cuda", True)["prepass"] == "kernel"
    assert stages.choose("cpu", True, {"all": "gpu"})["prepass"] == "kernel"
    assert stages.choose("cuda", True, skip=("kernel",))["prepass"] == "graph"
    assert stages.choose("cuda", True, {"prepass": "graph"})["prepass"] == "graph"
    assert stages.choose("cpu", True, {"prepass": "kernel"})["prepass"] == "kernel"
    with pytest.raises(UserError, match=r"^stage prepass=kernel: numba-cuda is missing$"):
        stages.choose("cuda", True, {"prepass": "kernel"}, skip=("kernel",),
                      refused={"kernel": "numba-cuda is missing"})


def test_the_runtime_chooses_the_kernel_only_where_numba_has_a_cuda_device(monkeypatch):
    """stage_rules: graphs on the CPU never import numba for it (unless asked); numba's
    simulator runs it on request only; without numba-cuda, or without a device numba can use,
    the table takes the graph and a request says what to install or why."""
    from resclip_deploy.runtime import cuda_prepass
    assert cuda_prepass.stage_rules("cpu") == (("kernel",), {})
    assert cuda_prepass.stage_rules("cpu", {"prepass": "kernel"}) == (("kernel",), {})  # sim
    assert cuda_prepass.stage_rules("cuda") == (("kernel",), {})
    monkeypatch.setattr(cuda_prepass, "simulated", lambda: False)
    skip, refused = cuda_prepass.stage_rules("cpu", {"prepass": "kernel"})
    assert skip == ("kernel",) and "these graphs run on the CPU" in refused["kernel"]
    from numba import cuda
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    skip, refused = cuda_prepass.stage_rules("cuda")
    assert skip == ("kernel",) and "numba finds no CUDA device" in refused["kernel"]
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    assert cuda_prepass.stage_rules("cuda") == ((), {})
    monkeypatch.setattr(cuda_prepass, "_numba_cuda",
                        lambda: (None, "numba-cuda is not installed; pip install x"))
    skip, refused = cuda_prepass.stage_rules("cuda", {"prepass": "kernel"})
    assert skip == ("kernel",) and "pip install" in refused["kernel"]


def test_stages_option_errors_are_one_line(tmp_path):
    from click.testing import CliRunner

    from resclip_deploy.cli import segment_main
    image = str(case_image(CASES[0]))
    for args, message in [
            (["--bundle", str(tmp_path), "--stages", "prepass"], "stage=implementation"),
            (["--reference", "--stages", "prepass=graph"], "has one implementation")]:
        result = CliRunner().invoke(segment_main, [image, "-o", str(tmp_path / "o"), *args])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
