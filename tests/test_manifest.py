"""The bundle contract: broken manifests, file names that leave the bundle, graphs that are not
what the manifest declares. Each is one 'error:' line and exit code 2, and nothing outside the
bundle is read."""

import builtins
import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FIXTURES
from resclip_deploy.bundle import MANIFEST, read_bundle
from resclip_deploy.cli import segment_main
from resclip_deploy.errors import UserError

PHOTO = str(FIXTURES / "images" / "chelsea.png")
# Records for people, free-form inside (their own type is still checked).
RECORDS = ("source", "versions", "timings_s", "verification")


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    return out


def manifest_of(bundle):
    return json.loads((bundle / MANIFEST).read_text())


def write(bundle, manifest):
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def segment(bundle, out):
    return CliRunner().invoke(segment_main, [PHOTO, "--bundle", str(bundle), "-o", str(out),
                                             "--device", "cpu", "-q"])


def one_error_line(result):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def field_paths(value, prefix=""):
    """Every field of the manifest as (path, keys): objects' keys and the graphs' tensor lists."""
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else key
            yield path, (key,)
            if path not in RECORDS:
                for sub, keys in field_paths(item, path):
                    yield sub, (key, *keys)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        for i, item in enumerate(value):
            for sub, keys in field_paths(item, f"{prefix}[{i}]"):
                yield sub, (i, *keys)


def edit(manifest, keys, change):
    m = copy.deepcopy(manifest)
    node = m
    for k in keys[:-1]:
        node = node[k]
    change(node, keys[-1])
    return m


def wrong_type(value):
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return 7
    if isinstance(value, list):
        return {"not": "a list"}
    if isinstance(value, dict):
        return ["not", "an object"]
    return 1.5      # null (an absent text encoder): a number is wrong too


def test_every_field_is_checked(bundle, tiny_bundle):
    """Each field missing, then of the wrong type: a UserError that names it (in-process, so
    that all of them run quickly), never a KeyError or TypeError."""
    manifest = manifest_of(tiny_bundle)
    paths = list(field_paths(manifest))
    assert len(paths) > 80 and "graphs.encoder.inputs[0].dtype" in dict(paths)
    for path, keys in paths:
        for how, change in (("missing", lambda n, k: n.pop(k)),
                            ("mistyped", lambda n, k: n.__setitem__(k, wrong_type(n[k])))):
            if how == "missing" and isinstance(keys[-1], int):
                continue
            write(bundle, edit(manifest, keys, change))
            with pytest.raises(UserError) as e:
                read_bundle(str(bundle))
            message = str(e.value)
            named = path.split(".")[-1].split("[")[0] if path.split(".")[0] != "files" \
                else path.split(".")[0]
            assert named in message or path in message, (how, path, message)
            assert "export" in message, (how, path, message)


@pytest.mark.parametrize("drop", ["files", "graphs", "vocabulary.classes", "params.method",
                                  "preprocess.mean", "text_encoder.graph", "verification"])
def test_missing_fields_from_the_command_line(bundle, tmp_path, drop):
    manifest = manifest_of(bundle)
    keys = drop.split(".")
    write(bundle, edit(manifest, keys, lambda n, k: n.pop(k)))
    line = one_error_line(segment(bundle, tmp_path / "o"))
    assert f"'{drop}' is missing" in line and "export the bundle again" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, expected", [
    (("params", "rcs", "yes"), "rcs='yes': must be true or false"),
    (("preprocess", "std", [1, 0, 1]), "'preprocess.std[1]' must be positive"),
    (("preprocess", "resize", "crop"), "'preprocess.resize' is 'crop'"),
    (("precision", None, "fp8"), "'precision' is 'fp8', not one of fp32, fp16, int8"),
    (("vocabulary", "queries", ["dog"]), "'vocabulary.queries' does not match"),
    (("preprocess", "short_side", 512), "but params.short_side is 336"),
    (("text_bank", None, "constant"),
     "'graphs.encoder.inputs' lists [pixels float rank 4, text float rank 2]; this bundle's "
     "settings give [pixels float rank 4]"),
    (("params", "sfr", False), "'graphs' lists ['encoder', 'head']; this bundle's settings give "
                               "['segmenter']"),
])
def test_malformed_values(bundle, tmp_path, change, expected):
    manifest = manifest_of(bundle)
    key, sub, value = change
    if sub is None:
        manifest[key] = value
    else:
        manifest[key][sub] = value
    write(bundle, manifest)
    line = one_error_line(segment(bundle, tmp_path / "o"))
    assert expected in line, line


def test_declared_outputs_must_fit_the_settings(bundle, tmp_path):
    manifest = manifest_of(bundle)
    manifest["graphs"]["encoder"]["outputs"].pop(1)         # the RCS map
    write(bundle, manifest)
    line = one_error_line(segment(bundle, tmp_path / "o"))
    assert "'graphs.encoder.outputs' lists [tokens float rank 3, window" in line
    assert "settings give [tokens float rank 3, rcs float rank 4" in line


def test_a_graph_that_is_not_what_the_manifest_declares(bundle, tmp_path):
    """The encoder's file swapped for the head's (checksums still right): the session's inputs
    differ from the declared layout."""
    manifest = manifest_of(bundle)
    manifest["graphs"]["encoder"]["file"] = "head.onnx"
    write(bundle, manifest)
    line = one_error_line(segment(bundle, tmp_path / "o"))
    assert "head.onnx has inputs [tokens float rank 3, rcs float rank 4" in line
    assert "the manifest declares [pixels float rank 4, text float rank 2]" in line


def test_text_bank_of_the_wrong_shape(bundle, tmp_path):
    np.save(bundle / "text_bank.npy", np.zeros((5, 64), np.float32))
    manifest = manifest_of(bundle)
    from resclip_deploy.bundle import file_sha256
    manifest["files"]["text_bank.npy"] = {"sha256": file_sha256(str(bundle / "text_bank.npy")),
                                          "bytes": os.path.getsize(bundle / "text_bank.npy")}
    write(bundle, manifest)
    line = one_error_line(segment(bundle, tmp_path / "o"))
    assert "text_bank.npy holds float32 (5, 64), not float32 (3, 64)" in line


OUTSIDE_NAMES = ["../outside.bin", "../../outside.bin", "sub/outside.bin", "/tmp/outside.bin",
                 "..", "a\\b"]


@pytest.mark.parametrize("name", OUTSIDE_NAMES)
@pytest.mark.parametrize("where", ["files", "graph", "tokenizer"])
def test_names_that_leave_the_bundle_are_refused_before_reading(bundle, tmp_path, monkeypatch,
                                                                name, where):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    manifest = manifest_of(bundle)
    if where == "files":
        manifest["files"][name] = {"sha256": "0" * 64, "bytes": 6}
    elif where == "graph":
        manifest["graphs"]["head"]["file"] = name
    else:
        manifest["text_encoder"]["tokenizer"] = name
    write(bundle, manifest)
    opened = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        opened.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", spy)
    with pytest.raises(UserError, match="not a plain file name inside the bundle"):
        read_bundle(str(bundle))
    assert opened == [os.path.realpath(bundle / MANIFEST)]
    monkeypatch.undo()
    line = one_error_line(segment(bundle, tmp_path / "o"))
    assert "not a plain file name inside the bundle" in line


def test_a_symlink_out_of_the_bundle_is_refused(bundle, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(bundle / "head.onnx", outside)
    os.remove(bundle / "head.onnx")
    os.symlink(outside, bundle / "head.onnx")
    line = one_error_line(segment(bundle, tmp_path / "o"))
    assert "head.onnx is a symbolic link to a file outside the bundle" in line


def test_a_symlink_inside_the_bundle_is_followed(bundle, tmp_path):
    os.rename(bundle / "head.onnx", bundle / "head-real.onnx")
    os.symlink("head-real.onnx", bundle / "head.onnx")
    manifest = manifest_of(bundle)
    manifest["files"]["head-real.onnx"] = manifest["files"]["head.onnx"]
    write(bundle, manifest)
    result = segment(bundle, tmp_path / "o")
    assert result.exit_code == 0, result.output


def test_broken_bundles_as_a_new_user_runs_them(bundle, tmp_path):
    """The installed console script: one 'error:' line on stderr, exit code 2, nothing else."""
    manifest = manifest_of(bundle)
    del manifest["vocabulary"]["classes"]
    write(bundle, manifest)
    exe = os.path.join(os.path.dirname(sys.executable), "resclip-segment")
    result = subprocess.run([exe, PHOTO, "--bundle", str(bundle), "-o", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: bundle {bundle}: manifest.json field 'vocabulary.classes' is missing; export "
        "the bundle again"]


def test_the_runtime_reads_the_normalisation_from_the_manifest(bundle, tiny_bundle):
    """A bundle's own mean/std are what the runtime applies (not a constant)."""
    from resclip_deploy.runtime.segmenter import Segmenter
    manifest = manifest_of(bundle)
    manifest["preprocess"]["mean"] = [0.0, 0.0, 0.0]
    write(bundle, manifest)
    seg = Segmenter.from_bundle(str(bundle), device="cpu")
    windows = seg_prepare(seg)
    base = seg_prepare(Segmenter.from_bundle(str(tiny_bundle), device="cpu"))
    assert seg.norm.mean == (0.0, 0.0, 0.0)
    assert not np.allclose(windows, base)


def seg_prepare(seg):
    from resclip_deploy.io import read_image
    from resclip_deploy.pipeline import prepare
    return prepare(read_image(PHOTO), seg.params, seg.patch, seg.norm).windows
