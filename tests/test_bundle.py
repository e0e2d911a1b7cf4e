"""Bundles: export the fixture weights, run them in ONNX Runtime without torch, and refuse bundles
that were altered, are from a newer schema, or were not finished."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import (CASES, CTRL_C_CHILD, FIXTURES, TINY, WEIGHTS, case_image, export_args,
                      load_case)
from resclip_deploy.cli import export_main, segment_main
from resclip_deploy.errors import UserError

@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fixture_parity_through_onnx_runtime(case, bundle_for, tmp_path):
    bundle = bundle_for(case)
    ref = load_case(case)
    result = CliRunner().invoke(segment_main, [str(case_image(case)), "-o", str(tmp_path),
                                               "--bundle", str(bundle), "--device", "cpu",
                                               "--save-probs", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / f"{case_image(case).stem}.npz") as out:
        labels, probs = out["labels"], out["probs"]
    assert (labels == ref["labels"]).mean() >= 0.995
    y, x = ref["sample_yx"][:, 0], ref["sample_yx"][:, 1]
    err = np.abs(probs[:, y, x].T - ref["probs_at"]).max(axis=1)
    assert (err <= 1e-3).mean() >= 0.99, np.quantile(err, [0.5, 0.99, 1.0])

    from resclip_deploy.runtime.segmenter import Segmenter
    seg = Segmenter.from_bundle(str(bundle), device="cpu")
    logits, step = seg.forward_windows(ref["crop0_input"])
    graph = "encoder" if case["sfr"]["on"] else "segmenter"
    outputs = seg.run_graph(graph, {"pixels": ref["crop0_input"]})
    if case["rcs"]["on"] and case["sfr"]["on"]:
        np.testing.assert_allclose(outputs["rcs"][0], ref["crop0_rcs_attn"], rtol=0, atol=1e-4)
    if case["sfr"]["on"]:
        np.testing.assert_array_equal(step.grids[0], ref["crop0_sfr_patch_labels"])
        np.testing.assert_allclose(step.matrices[0], ref["crop0_sfr_attn"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(step.prepass_maxprob[0], ref["crop0_temp_maxprob"], rtol=0,
                                   atol=1e-4)
    manifest = json.loads((bundle / "manifest.json").read_text())
    check = manifest["verification"]
    assert check["labels_agreement"] >= 0.995
    assert {g["batch"] for g in check["graphs"]} == {1, 2}
    if case["mode"]["type"] == "whole":
        assert len({tuple(g["size"]) for g in check["graphs"]}) == 2


def first_bundle(bundle_for):
    return bundle_for(CASES[0])


def test_manifest_records_files_settings_source_and_io(bundle_for):
    bundle = first_bundle(bundle_for)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["files"]) == {"encoder.onnx", "head.onnx", "text_bank.npy"}
    assert manifest["text_bank"] == "constant"
    assert manifest["source"]["sha256"] == json.loads(
        (FIXTURES / "parity" / "cases.json").read_text())["weights"]["rand-vit16-w192.pt"]["sha256"]
    assert manifest["params"]["connectivity"] == "reference"
    assert manifest["vocabulary"]["queries"][0] == "wall"
    enc = manifest["graphs"]["encoder"]
    assert [i["name"] for i in enc["inputs"]] == ["pixels"]
    assert [o["name"] for o in enc["outputs"]] == ["tokens", "rcs", "window", "prepass_logits"]
    assert enc["opset"] >= 18 and "torch" in manifest["versions"]


def copy_bundle(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_altered_graph_is_refused(bundle_for, tmp_path):
    from resclip_deploy.bundle import read_bundle
    bundle = copy_bundle(first_bundle(bundle_for), tmp_path / "b")
    data = bytearray((bundle / "head.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "head.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="head.onnx does not match its sha256"):
        read_bundle(str(bundle))
    result = CliRunner().invoke(segment_main, [str(FIXTURES / "images" / "chelsea.png"), "-o",
                                               str(tmp_path / "o"), "--bundle", str(bundle)])
    assert result.exit_code == 2 and "sha256" in result.output


def test_newer_schema_is_refused(bundle_for, tmp_path):
    from resclip_deploy.bundle import read_bundle
    bundle = copy_bundle(first_bundle(bundle_for), tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema"] += 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="newer than this resclip-deploy reads"):
        read_bundle(str(bundle))


def test_interrupted_export_leaves_nothing(tmp_path, fixture_clip):
    from resclip_deploy.export.bundle_export import export_bundle
    from resclip_deploy.params import PRESETS
    from resclip_deploy.vocab import preset_vocabulary

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_bundle(fixture_clip, preset_vocabulary("voc20"), PRESETS["voc20"][0],
                      str(tmp_path / "b"), progress=interrupt)
    assert os.listdir(tmp_path) == []


def test_existing_bundle_needs_force(bundle_for, tmp_path):
    case = next(c for c in CASES if c["name"] == "voc20_chelsea_clip")
    out = copy_bundle(bundle_for(case), tmp_path / "b")
    before = (out / "manifest.json").read_text()
    result = CliRunner().invoke(export_main, export_args(case, out))
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "manifest.json").read_text() == before
    result = CliRunner().invoke(export_main, export_args(case, out) + ["--force"])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").read_text() != before
    assert sorted(os.listdir(tmp_path)) == ["b"]


def test_bundle_runtime_never_imports_torch(bundle_for, tmp_path):
    bundle = first_bundle(bundle_for)
    code = (
        "import sys\n"
        "from resclip_deploy.cli import segment_main\n"
        f"segment_main([{str(FIXTURES / 'images' / 'chelsea.png')!r}, '-o', "
        f"{str(tmp_path)!r}, '--bundle', {str(bundle)!r}, '--device', 'cpu', '-q'], "
        "standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "chelsea.png").exists()


def test_gpu_request_without_gpu_is_a_clear_error(bundle_for, tmp_path):
    import onnxruntime as ort
    bundle = first_bundle(bundle_for)
    exe = os.path.join(os.path.dirname(sys.executable), "resclip-segment")
    result = subprocess.run([exe, str(FIXTURES / "images" / "chelsea.png"), "-o", str(tmp_path),
                             "--bundle", str(bundle), "--device", "cuda"],
                            capture_output=True, text=True)
    session = ort.InferenceSession(str(bundle / "head.onnx"),
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if session.get_providers()[0] == "CUDAExecutionProvider":
        assert result.returncode == 0, result.stderr      # a machine with a working GPU
    else:
        assert result.returncode == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "--device cuda" in lines[0] and "--device cpu" in lines[0]


def test_bundle_fixes_export_time_settings(bundle_for, tmp_path):
    bundle = first_bundle(bundle_for)
    image = str(FIXTURES / "images" / "chelsea.png")
    result = CliRunner().invoke(segment_main, [image, "-o", str(tmp_path), "--bundle",
                                               str(bundle), "--method", "clip"])
    assert result.exit_code == 2 and "--method" in result.output and "re-export" in result.output
    result = CliRunner().invoke(segment_main, [image, "-o", str(tmp_path), "--bundle",
                                               str(bundle), "--connectivity", "components",
                                               "--prob-thd", "0.5", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{}, {"mode": "whole", "method": "clearclip"},
                                     {"sfr": False, "method": "sclip"}],
                         ids=["slide-naclip", "whole-clearclip", "no-sfr-sclip"])
def test_tiny_random_open_clip_vit_exports_and_runs(tiny_files, tmp_path, changes):
    from resclip_deploy.export.bundle_export import export_bundle
    from resclip_deploy.export.clip_loader import load_clip
    from resclip_deploy.export.reference import ReferenceSegmenter
    from resclip_deploy.io import read_image
    from resclip_deploy.params import CUSTOM
    from resclip_deploy.runtime.segmenter import Segmenter
    from resclip_deploy.vocab import parse_class_list
    _, files = tiny_files
    clip = load_clip(TINY, str(files["safetensors"]))
    vocab = parse_class_list("cat|kitten,sofa,wall,floor")
    params = CUSTOM.replace(**changes)
    manifest = export_bundle(clip, vocab, params, str(tmp_path / "tiny"))
    assert manifest.model.to_dict() == {"patch": 32, "grid": 7, "width": 128, "depth": 4,
                                        "heads": 2, "embed_dim": 64, "rcs_blocks": [2]}
    seg = Segmenter.from_bundle(str(tmp_path / "tiny"), device="cpu")
    ref = ReferenceSegmenter.from_clip(clip, vocab, params)
    rgb = read_image(str(FIXTURES / "images" / "astronaut.png"))
    ours, theirs = seg.segment(rgb), ref.segment(rgb)
    assert ours.labels.shape == (512, 512) and ours.class_names == ("cat", "sofa", "wall", "floor")
    assert (ours.labels == theirs.labels).mean() >= 0.995
    np.testing.assert_allclose(ours.probs, theirs.probs, rtol=0, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-static", "int8-weights"])
def test_reduced_precision_bundles_are_what_they_say_and_report_agreement(
        precision, fixture_clip, tmp_path):
    import onnx
    from resclip_deploy.export.bundle_export import export_bundle
    from resclip_deploy.params import PRESETS
    from resclip_deploy.runtime.segmenter import Segmenter
    from resclip_deploy.vocab import preset_vocabulary
    case = next(c for c in CASES if c["name"] == "context60_astronaut")
    params = PRESETS["context60"][0].replace(connectivity="reference")
    manifest = export_bundle(fixture_clip, preset_vocabulary("context60"), params,
                             str(tmp_path / "b"), precision=precision)
    assert manifest.precision == precision
    check = manifest.verification
    assert 0.9 <= check["labels_agreement"] <= 1.0
    graph = onnx.load(str(tmp_path / "b" / "encoder.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    weight_types = {i.data_type for i in graph.graph.initializer}
    if precision == "fp16":
        assert check["thresholds"]["labels_agreement"] == 0.98
        assert onnx.TensorProto.FLOAT16 in weight_types
        inferred = onnx.shape_inference.infer_shapes(graph).graph
        types = {v.name: v.type.tensor_type.elem_type for v in
                 [*inferred.value_info, *inferred.input, *inferred.output]}
        for op in ("LayerNormalization", "Softmax"):
            inputs = [n.input[0] for n in graph.graph.node if n.op_type == op]
            assert inputs and {types[i] for i in inputs} == {onnx.TensorProto.FLOAT}, op
    elif precision == "int8":
        assert check["thresholds"] is None
        assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    elif precision == "int8-weights":
        # every matrix product's weight int8, restored in front of it; float activations; the
        # head untouched
        assert check["thresholds"] is None
        restored = {n.output[0] for n in graph.graph.node if n.op_type == "DequantizeLinear"}
        weights = {n.input[1] for n in graph.graph.node if n.op_type == "MatMul"}
        floats = {i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                  and len(i.dims) == 2}
        assert restored and restored <= weights and not weights & floats
        assert onnx.TensorProto.INT8 in weight_types and "QuantizeLinear" not in ops
        head = onnx.load(str(tmp_path / "b" / "head.onnx")).graph
        assert "DequantizeLinear" not in {n.op_type for n in head.node}
        assert onnx.TensorProto.INT8 not in {i.data_type for i in head.initializer}
    else:
        # calibrated: fixed activation scales (QDQ pairs around every matrix product), no
        # quantization at run time; the head graph too
        assert check["thresholds"] is None
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert not ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
        head = {n.op_type for n in onnx.load(str(tmp_path / "b" / "head.onnx")).graph.node}
        assert "QuantizeLinear" in head
    seg = Segmenter.from_bundle(str(tmp_path / "b"), device="cpu")
    from resclip_deploy.io import read_image
    rgb = read_image(str(case_image(case)))
    out = seg.segment(rgb)
    ref = load_case(case)
    agreement = (out.labels == ref["labels"]).mean()
    assert agreement >= (0.98 if precision == "fp16" else 0.85), agreement
    if precision.startswith("int8"):     # the same integer graphs in OpenVINO
        ov_seg = Segmenter.from_bundle(str(tmp_path / "b"), device="openvino")
        ov = ov_seg.segment(rgb)
        assert (ov.labels == ref["labels"]).mean() >= 0.85
        if precision == "int8-weights":     # integer products, said so; the head at f32
            assert ov_seg.providers["encoder"] == ["OpenVINO CPU f32 (weight products i8)"]
            assert ov_seg.providers["head"] == ["OpenVINO CPU f32"]


TRICKY = ["a photo of a café.", "  Multiple   SPACES\tand\nlines ", "rock'n'roll's", "t-shirt",
          "H2O 42 3.14", "naïve Ünïcödé", "emoji 🐱 cat", "fish &amp; chips", "&lt;b&gt;",
          "北京 tower", "über-straße", "it's", "PC/monitor", "...!!!???", "x" * 60]


def test_tokenizer_file_equals_open_clip_on_every_preset_prompt():
    import open_clip
    from resclip_deploy.export.text import TEMPLATES, tokenize
    from resclip_deploy.export.text_export import clip_bpe_tokenizer
    from resclip_deploy.params import PRESETS
    from resclip_deploy.runtime.text import encode_prompts
    from resclip_deploy.textbank import prompts_for
    from resclip_deploy.vocab import preset_vocabulary
    simple = open_clip.SimpleTokenizer()
    tok = clip_bpe_tokenizer(simple)
    prompts = TRICKY + [p for name in PRESETS
                        for p in prompts_for(preset_vocabulary(name).queries, TEMPLATES)]
    ours = encode_prompts(tok, prompts, 77, simple.sot_token_id, simple.eot_token_id)
    np.testing.assert_array_equal(ours, tokenize(simple, prompts))


@pytest.mark.slow
def test_text_encoder_bundle_takes_new_classes_without_torch(fixture_clip, tmp_path):
    from resclip_deploy.export.bundle_export import export_bundle
    from resclip_deploy.export.text import text_bank
    from resclip_deploy.params import PRESETS
    from resclip_deploy.vocab import parse_class_list, preset_vocabulary
    out = tmp_path / "b"
    manifest = export_bundle(fixture_clip, preset_vocabulary("voc20"), PRESETS["voc20"][0],
                             str(out), text_encoder=True)
    assert manifest.verification["text_bank_max_abs_diff"] <= 1e-4
    assert {"text_encoder.onnx", "tokenizer.json", "text_bank.npy"} <= set(manifest.files)
    classes = "cat|kitten|tabby,sofa,wall,fish & chips"
    code = (
        "import sys, numpy as np\n"
        "from resclip_deploy.runtime.segmenter import Segmenter\n"
        "from resclip_deploy.vocab import parse_class_list\n"
        f"seg = Segmenter.from_bundle({str(out)!r}, device='cpu', "
        f"classes=parse_class_list({classes!r}))\n"
        f"np.save({str(tmp_path / 'bank.npy')!r}, seg.text)\n"
        "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    vocab = parse_class_list(classes)
    expected = text_bank(fixture_clip.model, fixture_clip.tokenizer, vocab.queries)
    np.testing.assert_allclose(np.load(tmp_path / "bank.npy"), expected, rtol=0, atol=1e-5)
    result = CliRunner().invoke(segment_main, [str(FIXTURES / "images" / "chelsea.png"), "-o",
                                               str(tmp_path / "o"), "--bundle", str(out),
                                               "--classes", classes, "--device", "cpu",
                                               "--save-probs", "-q"])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "o" / "chelsea.npz") as d:
        assert d["probs"].shape == (4, 300, 451)
        assert list(d["class_names"]) == ["cat", "sofa", "wall", "fish & chips"]


def test_fixed_vocabulary_bundle_refuses_classes(bundle_for, tmp_path):
    result = CliRunner().invoke(segment_main, [str(FIXTURES / "images" / "chelsea.png"), "-o",
                                               str(tmp_path), "--bundle",
                                               str(first_bundle(bundle_for)), "--classes",
                                               "cat,dog"])
    assert result.exit_code == 2 and "--text-encoder" in result.output


@pytest.mark.slow
def test_ctrl_c_during_export_leaves_nothing(tmp_path):
    import signal
    import time
    exe = os.path.join(os.path.dirname(sys.executable), "resclip-export")
    proc = subprocess.Popen([exe, "--pretrained", str(WEIGHTS), "--preset", "ade20k", "-o",
                             str(tmp_path / "b"), "-q"], stderr=subprocess.PIPE, text=True,
                            **CTRL_C_CHILD)
    deadline = time.time() + 120
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, "export never started"
        time.sleep(0.05)
    time.sleep(0.5)                      # inside the export (the whole of it takes ~3 s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_large_graphs_keep_weights_in_a_data_file(tiny_files, tmp_path, monkeypatch):
    from resclip_deploy.export import onnx_export
    from resclip_deploy.export.bundle_export import export_bundle
    from resclip_deploy.export.clip_loader import load_clip
    from resclip_deploy.params import CUSTOM
    from resclip_deploy.runtime.segmenter import Segmenter
    from resclip_deploy.vocab import parse_class_list
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    _, files = tiny_files
    manifest = export_bundle(load_clip(TINY, str(files["pt"])), parse_class_list("a,b"), CUSTOM,
                             str(tmp_path / "b"))
    data_files = [f for f in manifest.files if not f.endswith((".onnx", ".npy"))]
    assert data_files and all(manifest.files[f].sha256 for f in data_files)
    assert manifest.verification["labels_agreement"] >= 0.995
    Segmenter.from_bundle(str(tmp_path / "b"), device="cpu")


def test_calibration_photos_are_checked_before_any_export(tmp_path):
    """--calibration belongs to int8-static, and its photos are read before the model loads."""
    case = CASES[0]
    photo = str(case_image(case))
    result = CliRunner().invoke(export_main, export_args(case, tmp_path / "a")
                                + ["--calibration", photo])
    assert result.exit_code == 2 and "--precision int8-static only" in result.output
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    result = CliRunner().invoke(export_main, export_args(case, tmp_path / "b")
                                + ["--precision", "int8-static", "--calibration", str(bad)])
    assert result.exit_code == 2 and "bad.png" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
