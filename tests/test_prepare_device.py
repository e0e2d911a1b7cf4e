"""scripts/prepare_device.py: what travels to the device in pieces comes back as the exact wheel,
or not at all; the planned calls fit the device tool's limits."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_prepare_device():
    """scripts/prepare_device.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        "prepare_device", os.path.join(ROOT, "scripts", "prepare_device.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prep = load_prepare_device()
BIG = "demo_gpu-1.0-cp312-cp312-manylinux_2_28_x86_64.whl"
SMALL = "tiny-1.0-py3-none-any.whl"
PIECE = 3000


@pytest.fixture
def packed(tmp_path, monkeypatch):
    """A 10 000-byte 'wheel' in four pieces of 3000 bytes (the last 1000) and a 200-byte one
    that travels whole, laid out in <here>/.device as for the device -> (here, manifest)."""
    monkeypatch.setattr(prep, "WHOLE_MAX", 1000)
    source, here = tmp_path / "source", tmp_path / "here"
    source.mkdir()
    here.mkdir()
    rng = np.random.default_rng(0)
    (source / BIG).write_bytes(rng.bytes(10_000))
    (source / SMALL).write_bytes(rng.bytes(200))
    manifest = prep.pack([str(source / BIG), str(source / SMALL)], str(here / ".device"),
                         str(here), PIECE)
    return here, manifest


def python3_first(tmp_path):
    """PATH with this interpreter as `python3` first (the device calls say python3)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    return str(bin_dir) + os.pathsep + os.environ["PATH"]


def test_the_planned_calls_reassemble_the_exact_wheel(packed, tmp_path):
    here, manifest = packed
    [wheel] = manifest["split"]
    assert [p["bytes"] for p in wheel["pieces"]] == [PIECE, PIECE, PIECE, 1000]
    assert [p["folder"] for p in wheel["pieces"]] == [".device/p1", ".device/p2", ".device/p3",
                                                      ".device/p4"]
    calls = prep.plan_calls(manifest, str(here), PIECE)
    assert [c["carry"] for c in calls] == [[".device/p1"], [".device/p2"], [".device/p3"],
                                           [".device/p4", ".device/whl"]]
    assert all(len(c["command"]) <= prep.COMMAND_MAX for c in calls)
    assert calls[-1]["command"].endswith(calls[-1]["check"])

    # The device side: a copy of the repository's scripts, each call's carried folders copied in
    # (replacing what was there), then its command, in order; of the last only the steps before
    # the check.
    device, home = tmp_path / "device", tmp_path / "home"
    (device / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "prepare_device.py"), device / "scripts")
    env = {**os.environ, "HOME": str(home), "OUT": str(tmp_path / "out"),
           "PATH": python3_first(tmp_path)}
    for call in calls:
        for path in call["carry"]:
            shutil.rmtree(device / path, ignore_errors=True)
            shutil.copytree(here / path, device / path)
        command = " && ".join(call["prepare"]) if "check" in call else call["command"]
        done = subprocess.run(["bash", "-c", command], cwd=device, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    whl = device / ".device" / "whl"
    assert sorted(os.listdir(whl)) == sorted([BIG, SMALL, "pieces.json"])
    assert (whl / BIG).read_bytes() == (tmp_path / "source" / BIG).read_bytes()
    assert sorted(os.listdir(home / "pieces")) == [f"{BIG}.part0{i}" for i in (1, 2, 3)]
    # a call whose piece did not arrive fails, whatever its diagnostics say
    missing = subprocess.run(["bash", "-c", calls[0]["command"]], cwd=device, env=env,
                             capture_output=True, text=True)
    assert missing.returncode != 0


def break_one(here, how):
    """Spoils the packed layout one way -> a name the error must mention."""
    piece = here / ".device" / "p2" / f"{BIG}.part02"
    if how == "corrupt piece":
        data = bytearray(piece.read_bytes())
        data[100] ^= 0xFF
        piece.write_bytes(bytes(data))
        return piece.name
    if how == "missing piece":
        piece.unlink()
        return piece.name
    manifest = here / ".device" / "whl" / "pieces.json"
    recorded = json.loads(manifest.read_text())
    recorded["split"][0]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(recorded))
    return BIG


@pytest.mark.parametrize("how", ["corrupt piece", "missing piece", "wrong whole digest"])
def test_a_bad_piece_stops_the_assembly_with_nothing_written(packed, tmp_path, how):
    here, _ = packed
    named = break_one(here, how)
    into = tmp_path / "into"
    into.mkdir()
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "prepare_device.py"), "--assemble",
         str(here / ".device" / "whl" / "pieces.json"), "--pieces",
         *[str(here / ".device" / f"p{i}") for i in range(1, 5)], "--into", str(into)],
        capture_output=True, text=True)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("prepare_device: ") and named in line, line
    assert os.listdir(into) == []                       # neither the wheel nor a partial file


def test_piece_size_fills_one_call_and_no_more():
    tree, whole = int(1.4 * prep.MIB), int(2.3 * prep.MIB)
    size = prep.piece_size(tree, whole)
    assert size % prep.MIB == 0
    assert size + tree + prep.MARGIN <= prep.CALL_LIMIT
    assert size + prep.MIB + tree + prep.MARGIN > prep.CALL_LIMIT
    with pytest.raises(prep.PrepareError, match="tests/fixtures"):
        prep.piece_size(60 * prep.MIB, whole)                   # the tree with the fixtures
    with pytest.raises(prep.PrepareError, match="whole wheels"):
        prep.piece_size(tree, 63 * prep.MIB)


def test_pieces_share_calls_so_that_few_calls_carry_them():
    """Full pieces one per call; the remainders of each split wheel ride with whl/ in the last
    call when they fit (ADE20K's device check: 6 calls where one piece per call took 8)."""
    mib = prep.MIB
    sizes = {".device/p1": 60 * mib, ".device/p2": 60 * mib, ".device/p3": 60 * mib,
             ".device/p4": 60 * mib, ".device/p5": int(3.7 * mib), ".device/p6": int(58.8 * mib)}
    groups = prep.group_pieces(sizes, int(16.6 * mib), int(60.4 * mib))
    assert groups == [[".device/p1"], [".device/p2"], [".device/p3"], [".device/p4"],
                      [".device/p6"], [".device/p5"]]
    # small pieces that do not all fit beside whl/ share the other calls
    assert prep.group_pieces({"a": 50, "b": 30, "c": 20, "d": 20}, 70, 100) == [
        ["a", "b", "d"], ["c"]]
    with pytest.raises(prep.PrepareError, match="does not fit"):
        prep.group_pieces({"a": 101}, 0, 100)


def test_tree_bytes_counts_what_travels(tmp_path):
    def write(path, size):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x" * size)
    for path, size in [("a.py", 10), ("tests/fixtures/big.bin", 1000), ("tests/t.py", 20),
                       ("new.txt", 300), (".device/p1/piece", 5000), (".gitignore", 9)]:
        write(path, size)
    (tmp_path / ".gitignore").write_text(".device/\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "a.py", "tests", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    # tracked and untracked-not-ignored files travel; ignored ones and the fixtures do not
    assert prep.tree_bytes(str(tmp_path)) == 10 + 20 + 300 + 9
    assert prep.tree_bytes(str(tmp_path), ()) == 10 + 20 + 300 + 9 + 1000


@pytest.mark.parametrize("spec, file", [
    ("onnxruntime-gpu==1.31.1", "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"),
    ("open_clip_torch==3.3.0", "open_clip_torch-3.3.0-py3-none-any.whl")])
def test_downloaded_finds_the_wheel_of_a_spec(tmp_path, spec, file):
    for name in (file, "onnxruntime_gpu-1.31.0-cp312-cp312-manylinux_2_28_x86_64.whl",
                 "open_clip_torch-3.3.1-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert prep.downloaded(spec, str(tmp_path)) == str(tmp_path / file)
