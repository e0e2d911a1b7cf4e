"""The command line as a new user meets it: outputs, and bad input -> one clear line, exit != 0."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import FIXTURES, WEIGHTS

SEGMENT = str(Path(sys.executable).parent / "resclip-segment")
IMAGE = str(FIXTURES / "images" / "chelsea.png")


def run(*args, cwd=None, env=None):
    return subprocess.run([SEGMENT, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


def segment(*args, **kw):
    return run("--reference", "--pretrained", WEIGHTS, "-q", *args, **kw)


def assert_one_line_error(result, *needles, code=2):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.slow
def test_outputs_custom_vocabulary_and_more_than_256_classes(tmp_path):
    classes = ",".join(f"thing{i}" for i in range(300))
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), cv2.resize(cv2.imread(IMAGE), (90, 60)))
    result = segment(small, "-o", tmp_path / "out", "--classes", classes, "--mode", "whole",
                     "--save-probs")
    assert result.returncode == 0, result.stderr
    png = cv2.imread(str(tmp_path / "out" / "small.png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and png.shape == (60, 90)
    with np.load(tmp_path / "out" / "small.npz") as d:
        np.testing.assert_array_equal(d["labels"], png)
        assert d["probs"].shape == (300, 60, 90) and d["probs"].dtype == np.float32
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


def test_missing_image(tmp_path):
    assert_one_line_error(segment(tmp_path / "nope.jpg", "-o", tmp_path, "--preset", "voc20"),
                          "nope.jpg", "does not exist", code=1)


@pytest.mark.slow
def test_corrupt_image_is_named_and_the_others_still_run(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    result = segment(bad, "-o", tmp_path / "out", "--preset", "voc20")
    assert_one_line_error(result, "broken.png", "corrupt", code=1)
    result = segment(bad, IMAGE, "-o", tmp_path / "out", "--preset", "voc20")
    assert result.returncode == 1
    assert "broken.png" in result.stderr and (tmp_path / "out" / "chelsea.png").exists()
    assert not (tmp_path / "out" / "broken.png").exists()


def test_empty_vocabulary(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(segment(IMAGE, "-o", tmp_path, "--classes", empty), "empty")


@pytest.mark.parametrize("option,value", [("--preset", "voc99"), ("--method", "resclip2"),
                                          ("--connectivity", "maybe")])
def test_unknown_choice(tmp_path, option, value):
    args = [IMAGE, "-o", tmp_path, option, value]
    if option != "--preset":
        args += ["--preset", "voc20"]
    assert_one_line_error(segment(*args), option, value)


def test_checkpoint_that_is_not_clip(tmp_path):
    ckpt = tmp_path / "resnet.pt"
    torch.save({"conv.weight": torch.zeros(2, 3)}, ckpt)
    assert_one_line_error(run(IMAGE, "-o", tmp_path, "--reference", "--pretrained", ckpt,
                              "--preset", "voc20"), "resnet.pt", "not a CLIP ViT state dict")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo owned > owned.txt",))


def test_checkpoint_with_pickled_code_is_refused_not_run(tmp_path):
    ckpt = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, ckpt)
    result = run(IMAGE, "-o", tmp_path, "--reference", "--pretrained", ckpt, "--preset", "voc20",
                 cwd=tmp_path)
    assert_one_line_error(result, "evil.pt", "refused")
    assert not (tmp_path / "owned.txt").exists()


def test_offline_tag_names_the_tag_and_the_fix(tmp_path):
    result = run(IMAGE, "-o", tmp_path, "--reference", "--model", "ViT-B-16-quickgelu",
                 "--pretrained", "openai", "--preset", "voc20",
                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(result, "openai", "--pretrained PATH")


def test_gelu_config_with_quickgelu_weights_is_refused(tmp_path):
    result = run(IMAGE, "-o", tmp_path, "--reference", "--model", "ViT-B-16",
                 "--pretrained", "openai", "--preset", "voc20")
    assert_one_line_error(result, "ViT-B-16-quickgelu")


def test_no_pipeline_chosen(tmp_path):
    assert_one_line_error(run(IMAGE, "-o", tmp_path, "--pretrained", WEIGHTS, "--preset",
                              "voc20"), "--reference")


def test_torch_free_modules_do_not_import_torch():
    code = ("import sys\n"
            "import resclip_deploy, resclip_deploy.cli, resclip_deploy.geometry\n"
            "import resclip_deploy.io, resclip_deploy.params, resclip_deploy.postprocess\n"
            "import resclip_deploy.sfr, resclip_deploy.vocab, resclip_deploy.runtime\n"
            "from resclip_deploy.cli import segment_main\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'open_clip' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_runtime_settings_are_named_once():
    """params.RUNTIME_SETTINGS makes the eval command's flags, the refusal's list and the
    summary's echo."""
    from resclip_deploy.cli import RUNTIME_OPTIONS, eval_main
    from resclip_deploy.params import RUNTIME_SETTINGS, ResCLIPParams, flag
    from resclip_deploy.segment import RUNTIME_ECHO
    assert set(RUNTIME_OPTIONS) == set(RUNTIME_SETTINGS) <= set(ResCLIPParams.__dataclass_fields__)
    flags = {opt for p in eval_main.params for opt in p.opts}
    assert {flag(s) for s in RUNTIME_SETTINGS} == {"--connectivity", "--prob-thd", "--temp-thd"}
    assert {flag(s) for s in RUNTIME_SETTINGS} <= flags
    assert RUNTIME_ECHO[:len(RUNTIME_SETTINGS)] == RUNTIME_SETTINGS
