"""OpenVINO as a second CPU runtime (--device openvino / openvino-bf16): fixture parity in fp32,
bf16 only when asked and then reported, the stage graphs and the text tower kept at f32, the
same I/O checks as ONNX Runtime, and clear errors."""

import sys
import threading

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CASES, case_image, load_case
from resclip_deploy.cli import segment_main
from resclip_deploy.errors import UserError
from resclip_deploy.io import read_image
from resclip_deploy.runtime import openvino as ovrt
from resclip_deploy.runtime.segmenter import Segmenter

# One case per kind of graph layout: SFR (encoder + head) slide and whole, no SFR (one graph)
# slide and whole.
OV_CASES = [c for c in CASES if c["name"] in
            ("ade20k_chelsea", "voc20_astronaut", "ade20k_chelsea_base", "voc20_chelsea_clip")]


@pytest.mark.parametrize("case", OV_CASES, ids=[c["name"] for c in OV_CASES])
def test_fixture_parity_through_openvino(case, bundle_for, tmp_path):
    """The reference code's labels and probabilities, at the thresholds ONNX Runtime meets."""
    bundle = bundle_for(case)
    ref = load_case(case)
    result = CliRunner().invoke(segment_main, [str(case_image(case)), "-o", str(tmp_path),
                                               "--bundle", str(bundle), "--device", "openvino",
                                               "--save-probs", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / f"{case_image(case).stem}.npz") as out:
        labels, probs = out["labels"], out["probs"]
    assert (labels == ref["labels"]).mean() >= 0.995
    y, x = ref["sample_yx"][:, 0], ref["sample_yx"][:, 1]
    err = np.abs(probs[:, y, x].T - ref["probs_at"]).max(axis=1)
    assert (err <= 1e-3).mean() >= 0.99, np.quantile(err, [0.5, 0.99, 1.0])

    rgb = read_image(str(case_image(case)))
    ours = Segmenter.from_bundle(str(bundle), device="openvino").segment(rgb)
    theirs = Segmenter.from_bundle(str(bundle), device="cpu").segment(rgb)
    assert (ours.labels == theirs.labels).mean() >= 0.999
    np.testing.assert_allclose(ours.probs, theirs.probs, rtol=0, atol=1e-4)


def test_openvino_sessions_are_f32_unless_bf16_is_asked_for(bundle_for):
    bundle = str(bundle_for(CASES[0]))
    seg = Segmenter.from_bundle(bundle, device="openvino")
    assert seg.device_type == "cpu" and seg.plan == Segmenter.from_bundle(bundle, "cpu").plan
    for name, session in seg.sessions.items():
        assert isinstance(session, ovrt.OpenVINOSession), name
        # read back from the compiled model: OpenVINO would pick bf16 itself on this CPU
        hint = session._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        assert hint == "f32", (name, hint)
        assert session.get_providers() == ["OpenVINO CPU f32"]


@pytest.mark.skipif(not ovrt.cpu_has_bf16(), reason="this CPU has no bf16 instructions")
def test_bf16_runs_the_encoder_only_and_stays_close(bundle_for):
    case = CASES[0]
    bundle = str(bundle_for(case))
    seg = Segmenter.from_bundle(bundle, device="openvino-bf16")
    for name, session in seg.sessions.items():
        # the head keeps f32 (FULL_PRECISION_GRAPHS); stage graphs choose their own
        want = "bf16" if name == "encoder" else "f32"
        assert session.get_providers() == [f"OpenVINO CPU {want}"], name
    rgb = read_image(str(case_image(case)))
    fp32 = Segmenter.from_bundle(bundle, device="cpu").segment(rgb)
    agreement = (seg.segment(rgb).labels == fp32.labels).mean()
    assert 0.9 <= agreement <= 1.0, agreement


def test_bf16_is_refused_on_a_cpu_without_it(bundle_for, monkeypatch):
    monkeypatch.setattr(ovrt, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match="no bf16 instructions.*--device openvino$"):
        Segmenter.from_bundle(str(bundle_for(CASES[0])), device="openvino-bf16")


def test_missing_openvino_is_a_clear_error(bundle_for, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setattr(ovrt, "_ov", ovrt._ov.__wrapped__)
    monkeypatch.setattr(ovrt, "_core", ovrt._core.__wrapped__)
    with pytest.raises(UserError, match=r"pip install 'resclip-deploy\[openvino\]'"):
        Segmenter.from_bundle(str(bundle_for(CASES[0])), device="openvino")


def test_a_graph_openvino_cannot_read_is_a_user_error(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(UserError, match="OpenVINO could not compile broken.onnx.*--device cpu"):
        ovrt.OpenVINOSession(str(bad), "openvino", None)


def test_one_session_serves_several_threads(bundle_for):
    """The video engine runs graphs from two threads: pooled requests, no shared buffers."""
    seg = Segmenter.from_bundle(str(bundle_for(CASES[0])), device="openvino")
    graph = "encoder" if "encoder" in seg.sessions else "segmenter"
    session = seg.sessions[graph]
    rng = np.random.default_rng(0)
    crop = seg.bundle.manifest.params.crop
    inputs = [rng.standard_normal((1, 3, crop, crop)).astype(np.float32) for _ in range(4)]
    alone = [session.run(None, {"pixels": x})[0] for x in inputs]
    together = [None] * len(inputs)

    def work(i):
        for _ in range(3):
            together[i] = session.run(None, {"pixels": inputs[i]})[0]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


def test_unknown_device_lists_openvino(bundle_for):
    with pytest.raises(UserError, match="openvino, openvino-bf16"):
        Segmenter.from_bundle(str(bundle_for(CASES[0])), device="openvin")
