import functools
import json
import os
from pathlib import Path

# No GPU here: numba's CUDA target runs in its simulator (tests/test_pamr_cuda.py). Read when
# numba is first imported, so before anything imports it.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "parity"
CASES = json.loads((PARITY / "cases.json").read_text())["cases"]
WEIGHTS = PARITY / "weights" / "rand-vit16-w192.pt"


def case_by_name(name):
    return next(c for c in CASES if c["name"] == name)


@functools.lru_cache(maxsize=None)
def _case_arrays(file):
    with np.load(PARITY / file, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    for array in arrays.values():
        array.setflags(write=False)
    return arrays


def load_case(case):
    """A fixture case's arrays by name, read once per session; read-only (copy to change one)."""
    return dict(_case_arrays(case["file"]))


def case_settings(case):
    """The settings a fixture case was made with, as ResCLIPParams fields (the preset's for the
    rest): the one case -> settings mapping of the tests."""
    return {"method": case["base_attention"], "rcs": case["rcs"]["on"], "sfr": case["sfr"]["on"],
            "mode": case["mode"]["type"], "connectivity": "reference",
            "short_side": case["short_side"]}


def case_params(case):
    from resclip_deploy.params import PRESETS
    return PRESETS[case["preset"]][0].replace(**case_settings(case))


def case_flags(case):
    """:func:`case_settings` as command-line flags (--preset and the model not included)."""
    from resclip_deploy.params import flag
    out = []
    for name, value in case_settings(case).items():
        if isinstance(value, bool):
            out.append(f"--{name}" if value else f"--no-{name}")
        else:
            out += [flag(name), str(value)]
    return out


def segment_many_counting_runs(seg, images):
    """seg.segment_many(images, with_probs=True) -> (results, windows per forward_windows run)."""
    runs = []
    original = seg.forward_windows
    seg.forward_windows = lambda windows, times=None: (runs.append(len(windows)),
                                                       original(windows, times))[1]
    try:
        return seg.segment_many(images, with_probs=True), runs
    finally:
        seg.forward_windows = original


def case_image(case):
    return (PARITY / case["image"]).resolve()


@pytest.fixture(scope="session")
def fixture_clip():
    from resclip_deploy.export.clip_loader import load_clip
    return load_clip("auto", str(WEIGHTS))


TINY = "resclip-test-tiny"
TINY_CFG = {"embed_dim": 64,
            "vision_cfg": {"image_size": 224, "layers": 4, "width": 128, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1,
                         "layers": 2}}


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """A tiny random open_clip ViT (4 blocks, patch 32, GELU) registered as TINY, saved as a
    state dict (.pt), safetensors and a wrapped {'state_dict': {'module.*'}} checkpoint."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("tiny")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None).eval()
    sd = model.state_dict()
    files = {"pt": folder / "tiny.pt", "safetensors": folder / "tiny.safetensors",
             "wrapped": folder / "wrapped.pt"}
    torch.save(sd, files["pt"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(files["safetensors"]))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}},
               files["wrapped"])
    return model, files


_BUNDLES = {}


def export_args(case, out):
    return ["--model", "auto", "--pretrained", str(WEIGHTS), "--preset", case["preset"],
            *case_flags(case), "-o", str(out), "-q"]


@pytest.fixture(scope="session")
def bundle_for(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")

    def get(case):
        if case["name"] not in _BUNDLES:
            out = root / case["name"]
            from click.testing import CliRunner
            from resclip_deploy.cli import export_main
            result = CliRunner().invoke(export_main, export_args(case, out),
                                        catch_exceptions=False)
            assert result.exit_code == 0, result.output
            _BUNDLES[case["name"]] = out
        return _BUNDLES[case["name"]]
    return get




def _default_sigint():
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Popen keyword for children that must get Ctrl-C: a test run started as a background job has
# SIGINT ignored, the children inherit that, and Python then installs no KeyboardInterrupt.
CTRL_C_CHILD = {"preexec_fn": _default_sigint}


@pytest.fixture(scope="session")
def tiny_bundle(tiny_files, tmp_path_factory):
    """The tiny ViT exported with the custom defaults (SFR on: encoder + head) and a text
    encoder, so that every manifest field is present. Tests copy it before changing it."""
    from resclip_deploy.export.bundle_export import export_bundle
    from resclip_deploy.export.clip_loader import load_clip
    from resclip_deploy.params import CUSTOM
    from resclip_deploy.vocab import parse_class_list
    out = tmp_path_factory.mktemp("tiny_bundle") / "b"
    export_bundle(load_clip(TINY, str(tiny_files[1]["pt"])), parse_class_list("cat|kitten,sofa"),
                  CUSTOM, str(out), text_encoder=True)
    return out


# Tests that need an exported bundle are slow (an export takes 10-40 s here): marked by the
# fixtures they use, so a new test is classed without anyone remembering to.
BUNDLE_FIXTURES = {"bundle_for", "tiny_bundle", "patch8_bundle"}


def pytest_collection_modifyitems(items):
    for item in items:
        if BUNDLE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
