"""The command-line tools' work as library calls: resclip-segment's segment_inputs and
resclip-bench's benchmark (resclip-eval's run_evaluation: tests/test_eval.py)."""

import json

import cv2
import numpy as np
import pytest

from conftest import FIXTURES, case_by_name, segment_many_counting_runs
from resclip_deploy.errors import UserError
from resclip_deploy.io import read_image
from resclip_deploy.runtime.segmenter import Segmenter
from resclip_deploy.segment import Reporter, SegmentOptions, segment_inputs

PHOTOS = [FIXTURES / "images" / "chelsea.png", FIXTURES / "images" / "astronaut.png"]


class Recorder(Reporter):
    def __init__(self):
        self.events = []

    def images_started(self, count):
        self.events.append(("start", count))

    def image_done(self, path, entry):
        self.events.append(("image", path))

    def failed(self, source, error):
        self.events.append(("failed", source))


def test_segment_inputs_writes_outputs_summary_and_reports(tiny_bundle, tmp_path):
    seg = Segmenter.from_bundle(str(tiny_bundle), device="cpu")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in PHOTOS:
        (folder / p.name).write_bytes(p.read_bytes())
    rec = Recorder()
    run = segment_inputs(seg, [str(folder), str(broken)], str(tmp_path / "out"),
                         SegmentOptions(save_probs=True), rec, bundle=str(tiny_bundle))
    assert run.inputs == 3 and not run.interrupted
    assert [f["input"] for f in run.failed] == [str(broken)]
    assert rec.events == [("start", 3), ("image", str(folder / "astronaut.png")),
                          ("image", str(folder / "chelsea.png")), ("failed", str(broken))]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(run.summary))
    assert summary["settings"]["connectivity"] == "components"
    for p in PHOTOS:
        expected = seg.segment(read_image(str(p))).labels
        png = cv2.imread(str(tmp_path / "out" / f"{p.stem}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(png, expected)
        with np.load(tmp_path / "out" / f"{p.stem}.npz") as d:
            assert d["probs"].shape == (2, *expected.shape)
        assert (tmp_path / "out" / f"{p.stem}_overlay.jpg").is_file()


def test_segment_inputs_refuses_videos_for_the_reference(tmp_path):
    with pytest.raises(UserError, match="needs --bundle"):
        segment_inputs(object(), ["clip.mp4"], str(tmp_path), pipeline="reference")


def test_benchmark_reports_every_stage(tiny_bundle):
    from resclip_deploy import pamr_cuda
    from resclip_deploy.bench import TIMED_STAGES, benchmark, format_report
    report = benchmark(str(tiny_bundle), size=(120, 160), runs=2, warmup=0, device="cpu",
                       reference=False, sweep=True, traffic=True, gpu_plan=True)
    assert report["input_hw"] == [336, 448] and report["windows"] == 6
    assert report["precision"] == "fp32"
    assert set(report["runtime"]["stages_s"]) == set(TIMED_STAGES)
    assert all(v >= 0 for v in report["runtime"]["stages_s"].values())
    assert [r["windows"] for r in report["sweep"]] == [1, 2, 4, 8]
    ours = report["runtime"]
    # CPU plan: encoder, SFR matrix, head and output graphs (pre-pass and connectivity numpy)
    assert 0 < ours["host_s"] < ours["total_s"] and ours["graph_runs"] == 4
    # Patch 32: 7x7 grids (N = 49) per 224 window, 3 queries; the output's merge matrices are
    # rows (120, 2, 7) and cols (160, 3, 7). The text bank and cols (every row band takes it
    # whole) went up with the first image of its size only.
    merge = 120 * 2 * 7 * 4
    # up: 6 windows of 3x224x224 float32 pixels, patch labels and connectivity masks for the
    # SFR matrix graph, the merge matrices. down: the pre-pass logits and uint8 labels.
    # Tokens, RCS map, window, SFR bias and final logits stay between the graphs.
    assert ours["bytes_to_device"] == 6 * 3 * 224 * 224 * 4 + 6 * 49 * 8 + 6 * 49 * 49 + merge
    assert ours["bytes_to_host"] == 6 * 3 * 49 * 4 + 120 * 160
    gpu = report["gpu_configuration"]
    assert gpu["stages"]["prepass"] == "graph" and gpu["labels_agreement"] == 1.0
    # GPU plan: uint8 crops and temp_thd up, patch labels down and back up with the masks
    assert gpu["bytes_to_device"] == 6 * 224 * 224 * 3 + 4 + 6 * 49 * 8 + 6 * 49 * 49 + merge
    assert 0 < gpu["host_s"] and 0 < gpu["first_image_host_s"]
    assert gpu["bytes_to_host"] == 6 * 49 * 8 + 120 * 160
    assert gpu["graph_runs"] == 6               # normalise, encoder, prepass, matrix, head, output
    text = format_report(report)
    assert "encoder" in text and "8 window(s)" in text and "reference" not in text
    assert "host time outside graph runs" in text and "GPU configuration" in text
    traffic = report["traffic"]
    # at least every graph output is a node output: the final logits alone are 6x3x49 floats
    assert set(traffic["node_output_bytes"]) == {"normalise", "encoder", "prepass",
                                                 "sfr_matrix", "head", "output", "output_probs"}
    assert traffic["pamr_bytes"] > 10 * 6 * 3 * 224 * 224 * 4     # 10 iterations of masks
    assert 0 < traffic["pamr_share"] < 1
    assert traffic["node_output_bytes"]["head"] > 6 * 3 * 49 * 4
    assert traffic["implied_gpu_ms"] == pytest.approx(1e3 * traffic["total_bytes"] / 4e12)
    assert "graph node outputs per image" in text
    # the pre-pass: its graph's bytes read and written against the CUDA kernels' model
    pre = traffic["prepass"]
    assert (pre["windows"], pre["window_hw"], pre["queries"]) == (6, [224, 224], 3)
    assert pre["mask_dtype"] == "float32" and pre["graph_written_bytes"] == traffic["pamr_bytes"]
    plan = pamr_cuda.Plan(6, 3, (224, 224), (7, 7), 10, 32)
    assert pre["kernel_bytes"] == plan.traffic()
    graph, kernels = pre["graph_read_bytes"] + pre["graph_written_bytes"], sum(
        plan.traffic().values())
    assert pre["ratio"] == pytest.approx(graph / kernels) and pre["ratio"] > 10
    assert pre["graph_ms"]["3 TB/s"] == pytest.approx(1e3 * graph / 3e12)
    assert pre["kernel_ms"]["4.3 TB/s"] == pytest.approx(1e3 * kernels / 4.3e12)
    assert "CUDA kernels" in text and "fewer bytes" in text


@pytest.mark.slow
def test_benchmark_against_the_reference(bundle_for):
    """The torch reference runs in a subprocess on the same image: labels agree."""
    from resclip_deploy.bench import benchmark, format_report
    bundle = bundle_for(case_by_name("voc20_chelsea_clip"))
    report = benchmark(str(bundle), runs=1, warmup=0, device="cpu", floor=True)
    assert report["labels_agreement"] >= 0.995 and report["speedup"] > 0
    text = format_report(report)
    assert "reference / runtime" in text
    # the floor: a plain tower of the bundle's size on the image's one (whole-mode) window
    floor = report["floor"]
    assert floor["windows"] == report["windows"] == 1 and floor["floor_s"] > 0
    assert floor["ratio"] == pytest.approx(report["runtime"]["total_s"] / floor["floor_s"])
    assert "runtime / floor" in text


def test_the_floor_tower_has_the_bundles_size(tiny_bundle):
    from resclip_deploy.bundle import read_bundle
    from resclip_deploy.export.floor import mlp_width, plain_tower
    m = read_bundle(str(tiny_bundle)).manifest.model
    assert mlp_width(str(tiny_bundle / "encoder.onnx"), m.width) == 4 * 128
    tower = plain_tower(str(tiny_bundle), (224, 224))
    assert len(tower.transformer.resblocks) == m.depth == 4
    assert tower.transformer.width == m.width and tower.conv1.kernel_size == (32, 32)
    assert tower.proj.shape == (m.width, m.embed_dim)


def test_the_text_bank_goes_up_once(tiny_bundle):
    """A --text-encoder bundle's bank is a graph input: counted (uploaded) with the first
    image only, as the output's cols matrix is with the first image of its size."""
    seg = Segmenter.from_bundle(str(tiny_bundle), device="cpu")
    rgb = read_image(str(PHOTOS[0]))
    seg.segment(rgb, with_probs=False)
    first = seg.io.to_device
    seg.io = type(seg.io)()
    seg.segment(rgb, with_probs=False)
    cols = seg._merge_cache[1]
    assert cols.shape[0] == rgb.shape[1]
    assert first - seg.io.to_device == seg.text.nbytes + cols.nbytes
    assert seg.text.nbytes == 3 * 64 * 4


@pytest.mark.parametrize("name", ["ade20k_chelsea", "voc20_astronaut"])
def test_segment_many_equals_segment_per_image(bundle_for, name):
    """Slide mode: images of different sizes share one run (windows are all crop-sized);
    whole-image mode: one group per size. Each result is the image segmented alone."""
    seg = Segmenter.from_bundle(str(bundle_for(case_by_name(name))), device="cpu")
    photos = [read_image(str(p)) for p in PHOTOS]
    images = [photos[0], photos[1], cv2.resize(photos[0], (200, 150)), photos[1]]
    many, runs = segment_many_counting_runs(seg, images)
    for image, got in zip(images, many):
        want = seg.segment(image)
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_allclose(got.probs, want.probs, rtol=0, atol=1e-6)
    # slide: one run for all four; whole image: one per distinct resized size (3)
    assert len(runs) == (1 if name.startswith("ade20k") else 3), runs


def test_traffic_counts_an_fp16_graph_in_its_declared_types(tmp_path):
    """ONNX Runtime's CPU provider runs an fp16 pre-pass graph's PAMR loop in fp32 (behind
    casts it inserts): --traffic sizes each node's tensors as the graph declares them, so the
    fp16 loop counts half the fp32 one's bytes, and an fp32 graph counts as profiled."""
    import json

    import onnxruntime as ort

    from resclip_deploy import stage_graphs
    from resclip_deploy.bench import declared_itemsizes, node_bytes
    from resclip_deploy.params import PAMR_DILATIONS
    totals = {}
    for fp16 in (False, True):
        model = stage_graphs.prepass_graph(16, 40.0, PAMR_DILATIONS, 10, fp16=fp16)
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp_path / f"p{fp16}")
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        session.run(None, {"prepass_logits": np.zeros((1, 20, 16), np.float32),
                           "windows": np.zeros((1, 3, 64, 64), np.float32),
                           "temp_thd": np.array(0.2, np.float32)})
        with open(session.end_profiling()) as f:
            events = [e for e in json.load(f) if e.get("cat") == "Node"
                      and e["name"].endswith("_kernel_time")]
        declared = declared_itemsizes(model)
        assert sum(e["name"].removesuffix("_kernel_time") in declared for e in events) \
            >= len(events) - 2
        totals[fp16] = [sum(map(sum, (node_bytes(e, sizes) for e in events)))
                        for sizes in (declared, None)]
    assert totals[False][0] == totals[False][1]            # fp32: declared = profiled
    assert totals[True][1] == totals[False][1]              # the CPU ran the fp16 loop in fp32
    assert 0.45 < totals[True][0] / totals[False][0] < 0.55
