"""The pre-pass's CUDA kernels (resclip_deploy/pamr_cuda.py) run in numba's CUDA simulator (the
conftest sets NUMBA_ENABLE_CUDASIM=1) against the CPU pre-pass: PAMR's sums bit for bit given
the same upsampled masks, the whole pre-pass within the stated tolerances, patch labels equal.
The kernels also compile for a real GPU here (PTX for sm_90, without a device)."""

import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from resclip_deploy import pamr, pamr_cuda, sfr
from resclip_deploy.params import PAMR_DILATIONS, ResCLIPParams
from resclip_deploy.pipeline import prepass_step

pytestmark = pytest.mark.skipif(not pamr_cuda.config.ENABLE_CUDASIM,
                                reason="the conftest runs numba's CUDA target in its simulator")


def _inputs(k, q, grid_hw, hw, seed=0):
    """(K, Q, gh, gw) logits with a clear structure per query (smooth bumps: realistic margins
    between queries) and (K, 3, h, w) windows."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((k, q) + grid_hw).astype(np.float32) * np.float32(0.05)
    windows = rng.standard_normal((k, 3) + hw).astype(np.float32)
    return logits, windows


def _launch(plan, logits, windows, scale=40.0, temp_thd=0.5, dilations=PAMR_DILATIONS):
    """The kernels' run on host arrays -> (argmax, maxprob, labels, weights)."""
    k, (h, w), (gh, gw) = plan.windows, plan.hw, plan.grid_hw
    out = (np.zeros((k, h, w), np.int64), np.zeros((k, h, w), np.float32),
           np.zeros((k, h // plan.patch, w // plan.patch), np.int64))
    scratch = tuple(np.zeros(s, plan.dtype) for s in
                    [(k, 8 * len(dilations), h, w)] + [(k, plan.queries, h, w)]
                    * plan.mask_buffers)
    tables = (*pamr_cuda.bilinear_tables(gh, h), *pamr_cuda.bilinear_tables(gw, w))
    pamr_cuda.run(pamr_cuda.kernels(dilations, plan.patch), plan, logits, windows, out, scratch,
                  tables, scale, temp_thd, 0)
    return (*out, scratch[0])


def _steps(kernels, mask, weights, grid_tables, steps):
    """``steps`` PAMR steps of the iterate kernel from a (K, Q, h, w) mask."""
    k, q, h, w = mask.shape
    src = mask.copy()
    for _ in range(steps):
        dst = np.empty_like(src)
        kernels.iterate[(-(-h * w // pamr_cuda.THREADS), k), pamr_cuda.THREADS](
            np.zeros((k, q, 1, 1), np.float32), src, 0, weights, dst, *grid_tables)
        src = dst
    return src


# (h, w, queries, steps, dilations): sizes from 1x1 to 48x64; dilations larger than the window
# (every neighbour clamped), as large, and smaller.
STEP_CASES = [(1, 1, 1, 3, (8, 16)), (5, 7, 40, 2, (8, 16)), (17, 9, 17, 4, (8, 16)),
              (24, 40, 3, 10, (8, 16)), (48, 64, 2, 2, (8, 16)), (9, 11, 5, 3, (1, 2)),
              (12, 10, 4, 2, (3,))]


@pytest.mark.parametrize("h,w,q,steps,dilations", STEP_CASES)
def test_pamr_steps_equal_the_cpu_bit_for_bit(h, w, q, steps, dilations):
    """Given the CPU's upsampled masks and weights, the kernel's PAMR steps give the CPU's
    numbers exactly: the compiled kernel's for PAMR's dilations, scipy's (the same sums, see
    test_pamr_kernel.py) for others."""
    rng = np.random.default_rng(h * w + q)
    image = rng.standard_normal((3, h, w)).astype(np.float32)
    aff = pamr.affinities(image, dilations)
    grid = rng.standard_normal((2, 3, q)).astype(np.float32)
    up = np.concatenate([pamr.upsampled_block(grid, b, (h, w))
                         for b in range(0, q, pamr.QUERY_BLOCK)], axis=1)[:, :q]
    if dilations == PAMR_DILATIONS:
        from resclip_deploy.pamr_kernel import scaled_refinement
        want = scaled_refinement(grid, aff, steps, 1.0)
    else:
        want = pamr.pamr(np.ascontiguousarray(up), pamr.as_matrix(aff, dilations), steps)
    mask = np.ascontiguousarray(up.T.reshape(1, q, h, w))
    tables = (*pamr_cuda.bilinear_tables(2, h), *pamr_cuda.bilinear_tables(3, w))
    got = _steps(pamr_cuda.kernels(dilations, 1), mask, aff[None], tables, steps)
    np.testing.assert_array_equal(got[0].reshape(q, h * w).T, want)


def test_a_changed_neighbour_offset_fails_the_comparison(monkeypatch):
    """The comparison above catches a kernel that reads one neighbour from the wrong place."""
    h, w, q = 20, 24, 2
    rng = np.random.default_rng(1)
    aff = pamr.affinities(rng.standard_normal((3, h, w)).astype(np.float32), PAMR_DILATIONS)
    up = rng.standard_normal((h * w, q)).astype(np.float32)
    want = pamr.pamr(up, pamr.as_matrix(aff, PAMR_DILATIONS), 1)
    tables = (*pamr_cuda.bilinear_tables(1, h), *pamr_cuda.bilinear_tables(1, w))
    mask = np.ascontiguousarray(up.T.reshape(1, q, h, w))
    offsets = list(pamr.OFFSETS)
    offsets[4] = (0, 2)                                   # (0, 1) read one cell further
    monkeypatch.setattr(pamr_cuda, "OFFSETS", tuple(offsets))
    pamr_cuda.kernels.cache_clear()
    try:
        got = _steps(pamr_cuda.kernels(PAMR_DILATIONS, 1), mask, aff[None], tables, 1)
    finally:
        pamr_cuda.kernels.cache_clear()
    assert not np.array_equal(got[0].reshape(q, h * w).T, want)


def test_upsampling_reads_the_grid_as_the_upsampled_mask_would():
    """The first step reads the logits through the bilinear tables: bit for bit the step over
    the upsampled mask (numpy's :func:`pamr_cuda.bilinear`), which is OpenCV's resize to within
    an ulp (IPP rounds some values the other way)."""
    k, q, (gh, gw), (h, w) = 2, 5, (3, 4), (24, 40)
    logits, windows = _inputs(k, q, (gh, gw), (h, w))
    up = pamr_cuda.bilinear(logits, (h, w))
    cv = np.stack([pamr.upsampled_block(g.transpose(1, 2, 0), 0, (h, w))[:, :q].T
                   .reshape(q, h, w) for g in logits])
    np.testing.assert_allclose(up, cv, rtol=0, atol=1.2e-7 * np.abs(cv).max())
    ks = pamr_cuda.kernels(PAMR_DILATIONS, 8)
    weights = np.stack([pamr.affinities(x, PAMR_DILATIONS) for x in windows])
    tables = (*pamr_cuda.bilinear_tables(gh, h), *pamr_cuda.bilinear_tables(gw, w))
    from_grid = np.empty((k, q, h, w), np.float32)
    ks.iterate[(-(-h * w // pamr_cuda.THREADS), k), pamr_cuda.THREADS](
        logits, from_grid, 1, weights, from_grid, *tables)
    np.testing.assert_array_equal(from_grid, _steps(ks, up, weights, tables, 1))


# (K, Q, grid, patch, iterations, threads): windows from 1x1 to 48x64, 1 to 40 queries, 0 to 10
# steps; queries split into blocks up to ``threads`` threads (the simulator starts a Python
# thread per CUDA thread: the large windows run one block of queries).
# Windows are whole patches (slide mode), or not (whole mode: the grid is h // patch, the vote
# ignores the rows and columns past it).
PREPASS_CASES = [(1, 1, (1, 1), 1, 0, 1 << 18, None), (2, 40, (2, 3), 3, 1, 1 << 18, None),
                 (1, 17, (3, 2), 5, 2, 400, None), (1, 3, (3, 4), 16, 10, 1, None),
                 (3, 6, (2, 2), 4, 3, 1 << 18, None), (1, 5, (3, 4), 8, 2, 1 << 18, (27, 35))]


def _cpu_prepass(logits, windows, patch, iterations, temp_thd, monkeypatch):
    """pipeline.prepass_step with ``iterations`` PAMR steps (the compiled kernel)."""
    import resclip_deploy.pipeline as pipeline
    monkeypatch.setattr(pipeline, "PAMR_ITERATIONS", iterations)
    k, q, gh, gw = logits.shape
    params = ResCLIPParams(logit_scale=40.0, temp_thd=temp_thd)
    return prepass_step(logits.reshape(k, q, gh * gw), windows, params, patch, workers=1)


@pytest.mark.parametrize("k,q,grid_hw,patch,iterations,threads,hw", PREPASS_CASES)
def test_prepass_kernels_match_the_cpu_prepass(k, q, grid_hw, patch, iterations, threads, hw,
                                               monkeypatch):
    """The four kernels against pipeline.prepass_step: weights bit for bit, argmax equal, the
    largest probability within 2e-6 (the online softmax), patch labels equal."""
    hw = hw or (grid_hw[0] * patch, grid_hw[1] * patch)
    logits, windows = _inputs(k, q, grid_hw, hw, seed=q)
    plan = pamr_cuda.Plan(k, q, hw, grid_hw, iterations, patch, target_threads=threads)
    argmax, maxprob, labels, weights = _launch(plan, logits, windows, temp_thd=0.3)
    want_argmax, want_maxprob, want_labels = _cpu_prepass(logits, windows, patch, iterations,
                                                          0.3, monkeypatch)
    if iterations:
        np.testing.assert_array_equal(
            weights, np.stack([pamr.affinities(x, PAMR_DILATIONS) for x in windows]))
    np.testing.assert_array_equal(argmax, want_argmax)
    np.testing.assert_allclose(maxprob, want_maxprob, rtol=2e-6, atol=0)
    np.testing.assert_array_equal(labels, want_labels)


def test_fp16_masks_stay_close_to_fp32():
    """fp16 bundles store masks and weights in fp16 between steps (half the bytes), every sum in
    fp32: on a 32x48 window argmax ≥ 99 % equal to fp32, the largest probability within 1e-2
    (fp16 keeps 11 bits of each mask value; times the logit scale 40, a few 1e-3 in
    probability), patch labels equal."""
    k, q, grid_hw, patch = 1, 4, (2, 3), 16
    hw = (32, 48)
    logits, windows = _inputs(k, q, grid_hw, hw, seed=3)
    full = _launch(pamr_cuda.Plan(k, q, hw, grid_hw, 10, patch, target_threads=1), logits,
                   windows)
    half = _launch(pamr_cuda.Plan(k, q, hw, grid_hw, 10, patch, half=True, target_threads=1),
                   logits, windows)
    agree = float((full[0] == half[0]).mean())
    print(f"fp16 masks: argmax {100 * agree:.2f} % equal to fp32, max probability off by "
          f"{np.abs(full[1] - half[1]).max():.2e}")
    assert agree >= 0.99
    assert np.abs(full[1] - half[1]).max() < 1e-2
    np.testing.assert_array_equal(full[2], half[2])


def test_patch_vote_is_the_cpu_vote_with_ties_to_the_smallest():
    """The vote kernel on hand-made labels with ties: sfr.pixel_labels + sfr.patch_labels."""
    rng = np.random.default_rng(5)
    patch, (gh, gw), q = 4, (3, 5), 6
    argmax = rng.integers(0, q, (2, gh * patch, gw * patch + 3))    # columns past the grid
    argmax[0, :4, :4] = np.repeat([[5, 5, 2, 2]], 4, axis=0)        # an 8-8 tie: 2 wins
    maxprob = rng.random(argmax.shape).astype(np.float32)
    labels = np.zeros((2, gh, gw), np.int64)
    pamr_cuda.kernels(PAMR_DILATIONS, patch).vote[labels.size, patch * patch](
        argmax, maxprob, np.float32(0.4), labels)
    want = [sfr.patch_labels(sfr.pixel_labels(a, m, 0.4), patch, q)
            for a, m in zip(argmax, maxprob)]
    np.testing.assert_array_equal(labels, np.stack(want))
    assert labels[0, 0, 0] in (0, 2)


def test_traffic_of_ade20k_fits_two_gigabytes_in_fp16():
    """The kernels' bytes per ADE20K image (6 windows of 224x224, 150 queries, 10 steps)."""
    plan = pamr_cuda.Plan(6, 150, (224, 224), (14, 14), 10, 16, half=True)
    traffic = plan.traffic()
    masks = 6 * 150 * 224 * 224 * 2
    # the first step reads the logits, eight steps read and write masks, the last reads them
    assert 17 * masks < sum(traffic.values()) < 2e9
    assert plan.query_blocks == 1 and plan.mask_buffers == 2
    full = pamr_cuda.Plan(6, 150, (224, 224), (14, 14), 10, 16).traffic()
    assert 1.9 < sum(full.values()) / sum(traffic.values()) < 2.0


def test_cpu_ortvalues_are_viewed_in_place_under_the_simulator():
    """What the kernels write through a view is in the OrtValue ONNX Runtime hands on."""
    from resclip_deploy.runtime.cuda_prepass import array_interface, view
    value = ort.OrtValue.ortvalue_from_shape_and_type([2, 3, 4], np.float16, "cpu", 0)
    v = view(value, (6, 4))
    v[:] = np.arange(24, dtype=np.float16).reshape(6, 4)
    np.testing.assert_array_equal(value.numpy().ravel(), np.arange(24, dtype=np.float16))
    with pytest.raises(ValueError, match="cannot view"):
        view(value, (5, 5))
    face = array_interface(0xABC000, (2, 3, 4), np.float16)
    assert face == {"shape": (2, 3, 4), "typestr": "<f2", "data": (0xABC000, False),
                    "strides": None, "version": 3, "stream": None}


def test_stage_launches_on_its_stream_and_syncs_before_returning(monkeypatch):
    """KernelPrepass: ONNX Runtime allocates the outputs where the graphs run, the kernels write
    them through views on the stage's stream, and the stream is synchronised before the stage
    returns (the next graph reads them)."""
    from resclip_deploy.runtime import cuda_prepass
    events = []

    class Stream:
        def synchronize(self):
            events.append("synchronize")

    def run(kernels, plan, logits, windows, out, scratch, tables, scale, temp_thd, stream):
        events.append(("run", logits.shape, windows.shape, [o.shape for o in out],
                       [o.dtype for o in out], [s.shape for s in scratch], type(stream)))
        out[2][:] = 7

    monkeypatch.setattr(pamr_cuda, "run", run)
    stage = cuda_prepass.KernelPrepass(40.0, 16, half=True, memory="cpu")
    stage._stream = Stream()
    logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((6, 150, 196), np.float32))
    windows = ort.OrtValue.ortvalue_from_numpy(np.zeros((6, 3, 224, 224), np.float32))
    argmax, maxprob, labels = stage(logits, windows, 0.5)
    assert events == [("run", (6, 150, 14, 14), (6, 3, 224, 224),
                       [(6, 224, 224), (6, 224, 224), (6, 14, 14)],
                       [np.int64, np.float32, np.int64],
                       [(6, 16, 224, 224), (6, 150, 224, 224), (6, 150, 224, 224)], Stream),
                      "synchronize"]
    assert all(isinstance(v, ort.OrtValue) for v in (argmax, maxprob, labels))
    assert (labels.numpy() == 7).all() and labels.device_name() == "cpu"
    assert stage._scratch[(6, 150, (224, 224))][0][0].dtype == np.float16


def test_kernels_compile_for_a_gpu_without_fused_multiply_adds():
    """Outside the simulator the kernels compile to PTX for sm_90 here (no device needed), fp32
    and fp16: the PAMR step has no FMA (its multiplies round on their own, as the CPU's)."""
    script = textwrap.dedent("""
        import numba.cuda.dispatcher as dispatcher
        from numba import cuda, types
        from resclip_deploy import pamr_cuda

        class Device:   # device functions ask the current device's compute capability
            compute_capability = (9, 0)

        dispatcher.get_current_device = lambda: Device()
        ks = pamr_cuda.kernels((8, 16), 16)
        a = lambda dt, nd: types.Array(dt, nd, "C")
        f32, i64 = types.float32, types.int64
        for m in (types.float32, types.float16):
            t = (a(i64, 2), a(f32, 2), a(i64, 2), a(f32, 2))
            sigs = {"affinity": (a(f32, 4), a(m, 4)),
                    "iterate": (a(f32, 4), a(m, 4), i64, a(m, 4), a(m, 4), *t),
                    "last": (a(f32, 4), a(m, 4), i64, i64, a(m, 4), f32, a(i64, 3), a(f32, 3),
                             *t),
                    "vote": (a(i64, 3), a(f32, 3), f32, a(i64, 3))}
            for name, sig in sigs.items():
                ptx, _ = cuda.compile_ptx(getattr(ks, name).py_func, sig, cc=(9, 0))
                print(m, name, ptx.count("fma.rn"), ptx.count("mul.rn.f32"))
    """)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = {tuple(line.split()[:2]): tuple(map(int, line.split()[2:]))
              for line in done.stdout.splitlines()}
    assert len(counts) == 8
    for m in ("float32", "float16"):
        fmas, muls = counts[m, "iterate"]
        assert fmas == 0 and muls >= 16


TINY8 = "resclip-test-tiny-patch8"


@pytest.fixture(scope="module")
def patch8_bundle(tmp_path_factory):
    """A tiny random ViT with 8-pixel patches, exported with 32-pixel windows: small enough for
    the simulator to run the whole pre-pass inside a Segmenter."""
    import json

    import open_clip
    import torch
    from resclip_deploy.export.bundle_export import export_bundle
    from resclip_deploy.export.clip_loader import load_clip
    from resclip_deploy.params import CUSTOM
    from resclip_deploy.vocab import parse_class_list
    folder = tmp_path_factory.mktemp("tiny8")
    (folder / f"{TINY8}.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1,
                     "layers": 1}}))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(TINY8, pretrained=None).state_dict(), folder / "m.pt")
    out = folder / "bundle"
    export_bundle(load_clip(TINY8, str(folder / "m.pt")), parse_class_list("cat|kitten,sofa"),
                  CUSTOM.replace(crop=32, stride=16, short_side=32), str(out))
    return out


def test_segmenter_runs_the_kernels_on_onnx_runtime_tensors(patch8_bundle):
    """prepass=kernel in a Segmenter (simulator, CPU tensors): the kernels read the encoder's
    outputs and write OrtValues that ONNX Runtime allocated, which the next graph binds; the
    pre-pass equals the CPU's (argmax, patch labels; probability within 2e-6), and so do the
    labels and probabilities of the image."""
    from resclip_deploy.runtime.segmenter import Segmenter
    rgb = np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    cpu = Segmenter.from_bundle(str(patch8_bundle), device="cpu")
    seg = Segmenter.from_bundle(str(patch8_bundle), device="cpu", stages={"prepass": "kernel"})
    assert cpu.plan["prepass"] == "numpy" and seg.plan["prepass"] == "kernel"
    assert "prepass" not in seg.sessions
    assert seg.providers["prepass"] == ["kernel: numba-cuda on numba's CUDA simulator"]
    seen = []
    kernel = seg._kernel
    seg._kernel = lambda *args: seen.append(kernel(*args)) or seen[-1]
    b = seg.segment(rgb, with_probs=True)
    got, = seen
    assert all(isinstance(v, ort.OrtValue) for v in got)
    prepared = cpu.prepare(rgb)
    assert len(prepared.windows) == 2
    want = cpu.prepass(cpu.encode(prepared.windows))
    np.testing.assert_array_equal(got[0].numpy(), want[0])
    np.testing.assert_allclose(got[1].numpy(), want[1], rtol=2e-6, atol=0)
    np.testing.assert_array_equal(got[2].numpy(), want[2])
    a = cpu.segment(rgb, with_probs=True)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.probs, b.probs)


def test_asking_for_the_kernels_without_a_device_is_one_line(patch8_bundle, tmp_path,
                                                             monkeypatch):
    """resclip-segment --stages prepass=kernel on a CPU (outside the simulator): exit 2, one
    line that says why and what to do."""
    from click.testing import CliRunner

    from resclip_deploy.cli import segment_main
    from resclip_deploy.runtime import cuda_prepass
    monkeypatch.setattr(cuda_prepass, "simulated", lambda: False)
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((32, 40, 3), np.uint8))
    result = CliRunner().invoke(segment_main, [str(image), "-o", str(tmp_path / "o"), "--bundle",
                                               str(patch8_bundle), "--device", "cpu",
                                               "--stages", "prepass=kernel"])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert "stage prepass=kernel: runs on a CUDA device" in line and "--device cuda" in line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
