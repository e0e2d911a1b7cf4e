"""TensorRT optimisation profiles that TensorRT can build: every graph the runtime builds (the
bundle's, the stage graphs, the fused chain), slide and whole-image mode, fp32 and fp16, runs on
the CPU provider at the min, opt and max point of each profile it gets, with inputs of exactly
those shapes. TensorRT checks the same at build time ("kOPT values ... violate shape
constraints" when one graph's inputs disagree at a level). Runs of the segmenter stay within
the profiles' window maximum, with results unchanged."""

from collections import defaultdict

import numpy as np
import onnxruntime as ort
import pytest

from conftest import segment_many_counting_runs
from resclip_deploy import stage_graphs
from resclip_deploy.bundle import read_bundle
from resclip_deploy.runtime.providers import (ORIENTATIONS, SCALAR_INPUTS, fits,
                                              max_windows_per_run, orientations, profile_shapes,
                                              run_levels)

LEVELS = ("min", "opt", "max")
# name -> (settings, precision, text bank as an input): between them every graph the runtime
# builds, both modes, both precisions, a fixed and a runtime vocabulary. The SFR bundles have a
# long-side cap of 1024 (the rules are the same; their largest runs cost a CPU half as much).
EXPORTS = {"slide_fp32": ({"long_side_max": 1024}, "fp32", False),
           "whole_fp16": ({"mode": "whole", "long_side_max": 1024}, "fp16", False),
           "plain_fp16_text": ({"sfr": False}, "fp16", True)}


@pytest.fixture(scope="module")
def bundles(tiny_files, tmp_path_factory):
    from conftest import TINY

    from resclip_deploy.export.bundle_export import export_bundle
    from resclip_deploy.export.clip_loader import load_clip
    from resclip_deploy.params import CUSTOM
    from resclip_deploy.vocab import parse_class_list
    clip = load_clip(TINY, str(tiny_files[1]["pt"]))
    root = tmp_path_factory.mktemp("profiles")
    for name, (settings, precision, text) in EXPORTS.items():
        export_bundle(clip, parse_class_list("cat|kitten,sofa"), CUSTOM.replace(**settings),
                      str(root / name), precision=precision, text_encoder=text)
    return root


def runtime_graphs(bundle_dir):
    """(manifest, label -> (graph: a file path or serialised model, its vocabulary's query
    count or None for the bundle's graphs)): what Segmenter.from_bundle and fused.fused_session
    build for this bundle, in every variant."""
    from resclip_deploy.runtime.fused import fused_model
    bundle = read_bundle(str(bundle_dir))
    m = bundle.manifest
    graphs = {name: (bundle.graph_file(name), None) for name in m.graphs}
    queries = len(m.vocabulary.queries)

    def stage(name, **kw):
        params = m.params.replace(connectivity=kw.pop("connectivity", None))
        return stage_graphs.stage_model(name, params, m.model.patch,
                                        m.vocabulary.query_to_class, m.preprocess.norm,
                                        fp16=m.precision == "fp16",
                                        **kw).SerializeToString(), queries
    graphs["normalise"] = stage("normalise")
    if m.params.sfr:
        graphs["prepass"] = stage("prepass")
        for connectivity in ("components", "reference"):
            graphs[f"connectivity_{connectivity}"] = stage("connectivity",
                                                           connectivity=connectivity)
        graphs["sfr_matrix"] = stage("sfr_matrix")
    graphs["output"] = stage("output", probs=False)
    graphs["output_probs"] = stage("output", probs=True)
    if not m.text_input:
        graphs["fused"] = fused_model(str(bundle_dir)).SerializeToString(), queries
    return m, graphs


# What each graph input's axes say about its run: (quantity, axis).
READINGS = {"pixels": (("k", 0), ("h", 2), ("w", 3)), "windows": (("k", 0), ("h", 2), ("w", 3)),
            "frames": (("k", 0), ("h", 1), ("w", 2)), "tokens": (("k", 0), ("t", 1)),
            "rcs": (("k", 0), ("t", 2), ("t", 3)), "window": (("t", 0), ("t", 1)),
            "sfr_bias": (("k", 0), ("t", 1), ("t", 2)),
            "prepass_logits": (("k", 0), ("q", 1), ("n", 2)),
            "logits": (("k", 0), ("q", 1), ("n", 2)),
            "patch_labels": (("k", 0), ("gh", 1), ("gw", 2)),
            "connected": (("k", 0), ("n", 1), ("n", 2)),
            "rows": (("out_h", 0), ("ny", 1), ("gh", 2)),
            "cols": (("out_w", 0), ("nx", 1), ("gw", 2)), "text": (("q", 0),)}


def implied_run(shapes, manifest):
    """The run the input shapes describe: each quantity is read from every input that carries
    it, and all readings must agree, as TensorRT requires of a profile point."""
    patch = manifest.model.patch
    seen = defaultdict(set)
    for name, shape in shapes.items():
        found = {key: shape[axis] for key, axis in READINGS[name]}
        for key, axis in READINGS[name]:
            seen[key].add((shape[axis], name))
        if "h" in found:                                   # a window: its patch grid
            seen["gh"].add((found["h"] // patch, name))
            seen["gw"].add((found["w"] // patch, name))
        if name == "patch_labels":
            seen["n"].add((shape[1] * shape[2], name))
    run = {}
    for key, values in seen.items():
        assert len({v for v, _ in values}) == 1, f"inputs disagree on {key}: {sorted(values)}"
        run[key] = next(iter(values))[0]
    if "gh" in run:
        assert run.setdefault("n", run["gh"] * run["gw"]) == run["gh"] * run["gw"], \
            f"{run['n']} patches, not a {run['gh']}x{run['gw']} grid: {sorted(seen.items())}"
    if "n" in run:
        assert run.setdefault("t", run["n"] + 1) == run["n"] + 1, \
            f"{run['t']} tokens for {run['n']} patches: {sorted(seen.items())}"
    if "t" in run:
        run.setdefault("n", run["t"] - 1)
    if "ny" in run:
        assert run["k"] % (run["ny"] * run["nx"]) == 0, \
            f"{run['k']} windows are no whole number of {run['ny']}x{run['nx']} images"
        run["f"] = run["k"] // (run["ny"] * run["nx"])
    run.setdefault("q", len(manifest.vocabulary.queries))
    return run


def expected_outputs(run, manifest):
    model, classes = manifest.model, len(manifest.vocabulary.class_names)
    k, q, t = run["k"], run["q"], run.get("t")
    shapes = {"tokens": (k, t, model.width), "rcs": (k, model.heads, t, t), "window": (t, t),
              "sfr_matrix": (k, t, t), "sfr_bias": (k, t, t)}
    if "h" in run:
        shapes.update(windows=(k, 3, run["h"], run["w"]), prepass_argmax=(k, run["h"], run["w"]),
                      prepass_maxprob=(k, run["h"], run["w"]))
    if "n" in run:
        n = run["n"]
        shapes.update(prepass_logits=(k, q, n), logits=(k, q, n), connected=(k, n, n))
    if "gh" in run:
        shapes["patch_labels"] = (k, run["gh"], run["gw"])
    if "f" in run:
        shapes.update(labels=(run["f"], run["out_h"], run["out_w"]),
                      probs=(run["f"], classes, run["out_h"], run["out_w"]))
    return shapes


_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
           "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(int64)": np.int64}


def feeds_for(session, shapes, queries, rng):
    """Random inputs of exactly ``shapes`` and the session's dtypes (patch labels within the
    queries; thresholds as scalars)."""
    feeds = {}
    for arg in session.get_inputs():
        dtype = _DTYPES[arg.type]
        shape = () if arg.name in SCALAR_INPUTS else shapes[arg.name]
        if dtype == np.uint8:
            feeds[arg.name] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif dtype == np.bool_:
            feeds[arg.name] = rng.random(shape) < 0.5
        elif dtype == np.int64:
            feeds[arg.name] = rng.integers(0, queries, shape, dtype=np.int64)
        elif arg.name in SCALAR_INPUTS:
            feeds[arg.name] = np.array(0.1, dtype=dtype)
        else:
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_at_levels(session, manifest, profiles):
    """Run ``session`` at each level of ``profiles`` ((min, opt, max) per input); -> one line
    per level that failed (empty when all ran with the outputs their run implies)."""
    rng = np.random.default_rng(0)
    failures = []
    for i, level in enumerate(LEVELS):
        shapes = {name: levels[i] for name, levels in profiles.items()}
        try:
            run = implied_run(shapes, manifest)
            out = session.run(None, feeds_for(session, shapes, run["q"], rng))
            want = expected_outputs(run, manifest)
            got = {o.name: v.shape for o, v in zip(session.get_outputs(), out)}
            wrong = {n: (s, want[n]) for n, s in got.items() if s != want[n]}
            assert not wrong, f"output shapes (got, implied): {wrong}"
        except Exception as e:  # noqa: BLE001 — collected: every graph and level is reported
            failures.append(f"{level} {shapes}: {type(e).__name__}: {str(e)[:300]}")
    return failures


@pytest.mark.parametrize("name", list(EXPORTS))
def test_every_graph_runs_at_every_profile_point(bundles, name):
    manifest, graphs = runtime_graphs(bundles / name)
    failures = []
    for label, (graph, queries) in graphs.items():
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        inputs = tuple(i.name for i in session.get_inputs())
        for orientation in orientations(manifest, inputs, queries):
            profiles = profile_shapes(manifest, inputs, orientation, queries)
            for key, levels in profiles.items():       # TensorRT: min <= opt <= max per axis
                assert all(a <= b <= c for a, b, c in zip(*levels)), (label, key, levels)
            failures += [f"{label} ({orientation}) {line}"
                         for line in run_at_levels(session, manifest, profiles)]
    assert not failures, "\n".join(failures)


def test_whole_image_graphs_have_a_profile_per_orientation(bundles):
    """Whole-image mode: the window is the image, at most short side x long-side cap one way or
    the other; one profile (ONNX Runtime's TensorRT provider uses only profile 0) would have to
    reach the cap both ways (4 x 2048 x 2048 pixels: 16,385 tokens of ViT-B/16)."""
    m = read_bundle(str(bundles / "whole_fp16")).manifest
    p = m.params
    assert orientations(m, ("pixels",)) == ORIENTATIONS
    landscape, portrait = (profile_shapes(m, ("pixels",), o)["pixels"] for o in ORIENTATIONS)
    assert landscape[2][2:] == (p.short_side, p.long_side_max)
    assert portrait[2][2:] == (p.long_side_max, p.short_side)
    image = {"pixels": (1, 3, p.short_side, p.short_side * 4 // 3)}     # a 4:3 photo
    assert fits(profile_shapes(m, ("pixels",), "landscape"), image)
    assert not fits(profile_shapes(m, ("pixels",), "portrait"), image)
    # slide mode: windows are crop x crop whichever way the image lies; the output graph's
    # merge matrices (windows along each side) are not
    s = read_bundle(str(bundles / "slide_fp32")).manifest
    assert orientations(s, ("pixels", "tokens", "sfr_bias")) == ORIENTATIONS[:1]
    assert orientations(s, ("logits", "rows", "cols")) == ORIENTATIONS


def test_query_ranges_follow_the_vocabulary(bundles):
    """A bundle's own text bank is a graph constant: its query count is fixed. A runtime
    vocabulary (text bank as an input) may have any size."""
    fixed = read_bundle(str(bundles / "slide_fp32")).manifest
    q = len(fixed.vocabulary.queries)
    assert {levels[1] for levels in
            profile_shapes(fixed, ("prepass_logits",))["prepass_logits"]} == {q}
    free = read_bundle(str(bundles / "plain_fp16_text")).manifest
    text = profile_shapes(free, ("text", "logits"))
    assert [s[0] for s in text["text"]] == [1, q, 256] == [s[1] for s in text["logits"]]


def test_the_largest_run_holds_any_one_image(bundles):
    """segment_many and the video engine pack whole images into runs of at most
    max_windows_per_run windows: an image never has more."""
    from resclip_deploy import geometry
    for name in ("slide_fp32", "whole_fp16"):
        m = read_bundle(str(bundles / name)).manifest
        p = m.params
        top = max(len(geometry.window_boxes(*geometry.keep_ratio_size(h, w, p.short_side,
                                                                       p.long_side_max),
                                            p.mode, p.crop, p.stride))
                  for h, w in [(1, 1), (3, 4), (9, 16), (1, 6), (1, 20), (20, 1), (1, 100)])
        assert top <= max_windows_per_run(m) == run_levels(m)[2].windows


def test_pack_runs_keeps_images_whole_and_in_order():
    from resclip_deploy.runtime.segmenter import pack_runs
    assert pack_runs([8, 8, 6, 4], 10) == [[0], [1], [2, 3]]
    assert pack_runs([2, 2, 2, 2, 2], 6) == [[0, 1, 2], [3, 4]]
    assert pack_runs([12, 3], 10) == [[0], [1]]          # an item larger than a run: alone
    assert pack_runs([], 4) == []


def _images():
    rng = np.random.default_rng(3)
    # network sizes 336x505 (2x4 windows), 336x476 (2x4), 448x336 (3x2), 336x336 (2x2)
    return [rng.integers(0, 256, hw + (3,), dtype=np.uint8)
            for hw in [(300, 451), (120, 170), (200, 150), (224, 224)]]


def test_segment_many_beyond_the_run_limit_equals_one_by_one(bundles):
    from resclip_deploy.runtime.segmenter import Segmenter
    seg = Segmenter.from_bundle(str(bundles / "slide_fp32"), device="cpu")
    images = _images()
    seg.max_windows = 10                     # 8 + 8 + 6 + 4 windows: runs of 8, 8 and 6 + 4
    many, runs = segment_many_counting_runs(seg, images)
    assert runs == [8, 8, 10]
    for image, got in zip(images, many):
        want = seg.segment(image, with_probs=True)
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_allclose(got.probs, want.probs, rtol=0, atol=1e-6)


def test_video_batches_beyond_the_run_limit_equal_frames_alone(bundles):
    from resclip_deploy.runtime.segmenter import Segmenter
    from resclip_deploy.runtime.video import VideoEngine
    seg = Segmenter.from_bundle(str(bundles / "slide_fp32"), device="cpu")
    frames = [(i, image) for i, image in enumerate(_images()[1:2] * 3 + _images()[3:] * 2)]
    seg.max_windows = 10                     # frames of 8 windows go alone, of 4 in pairs
    runs = []
    original = seg.encode
    seg.encode = lambda windows: (runs.append(len(windows)), original(windows))[1]
    out = list(VideoEngine(seg, frames_per_batch=5).run(iter(frames)))
    seg.encode = original
    assert max(runs) <= 10 and sum(runs) == 3 * 8 + 2 * 4
    assert [i for i, _, _ in out] == list(range(5))
    for (_, rgb), (_, _, result) in zip(frames, out):
        np.testing.assert_array_equal(result.labels, seg.segment(rgb, with_probs=False).labels)
