#!/usr/bin/env python3
"""What the device check carries to a device machine, made here and reassembled there.

Here, in the project's environment (PyPI reachable):

    python scripts/prepare_device.py [--out .device]

downloads the cp312 manylinux x86_64 wheels the device image lacks (WHEELS), builds this
project's wheel, splits each wheel too big for one call into pieces, one folder per piece,
writes the manifest (every piece's and every whole wheel's exact name, size and sha256) and
prints the device calls, one JSON object each: what to carry and the command. DEVELOPERS.md
says why these wheels and how to run the calls.

There, in the last call, before anything is installed (standard library only):

    python3 scripts/prepare_device.py --assemble .device/whl/pieces.json \\
        --pieces "$HOME/pieces" .device/p5 --into .device/whl

checks every piece against the manifest, joins them under the wheel's exact file name and
checks the whole; on any mismatch it names the piece and leaves nothing written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Iterator, Optional

MIB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the device image (Python 3.12, torch 2.11 + CUDA 13, CPU onnxruntime 1.30, onnx,
# onnxscript, timm, numba, ...) lacks for the check: the GPU build of ONNX Runtime (1.31.1: CUDA
# 13 and cuDNN 9, the libraries the image's torch brings), open_clip and its two small needs,
# and the pre-pass kernels' numba-cuda with the CUDA 13 compiler it needs (NVVM, libdevice: the
# image's torch brings no compiler) and its CUDA Python bindings. The versions are the ones the
# project's environment is tested with.
WHEELS = ("onnxruntime-gpu==1.31.1", "open_clip_torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.5",
          "numba-cuda==0.30.4", "cuda-core==1.2.2", "cuda-bindings==13.5.0",
          "cuda-pathfinder==1.9.1", "nvidia-nvvm==13.0.88")
# manylinux_2_12 too: the nvidia-nvvm wheel is tagged manylinux2010.
DEVICE_TARGET = ("--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                 "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_12_x86_64")
# One device call carries the working tree and its carried paths, 64 MiB together.
CALL_LIMIT = 64 * MIB
# Room for files that appear in the tree between preparing and calling.
MARGIN = 2 * MIB
# The device run goes from a tree without the test fixtures (tests do not run there).
LEFT_BEHIND = ("tests/fixtures/",)
# Wheels up to this size travel whole, beside the last piece; bigger ones are split.
WHOLE_MAX = 8 * MIB
MANIFEST = "pieces.json"
PIECES_HOME = '"$HOME/pieces"'
CHECK = ("PYTHONUNBUFFERED=1 timeout 540 bash scripts/device_check.sh --case ade20k --frames 60"
         " --runs 5 -o $OUT/device_check.json 2>&1 | tee $OUT/device_check.log")
# What the image holds, asked in the first call (its answer cannot fail the call).
DIAGNOSE = ("{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -m "
            "pip list 2>/dev/null | grep -iE '^(torch|torchvision|numpy|timm|onnx|onnxruntime) '"
            "; true; }")
# A device command is at most this long.
COMMAND_MAX = 2000
# Calls that only move a piece are quick; the last one installs and runs the check (timeout 540).
MOVE_TIMEOUT_S, CHECK_TIMEOUT_S = 120, 600
# Build outputs and folders a project wheel does not need (tests, fixtures, caches).
NOT_BUILT = ("tests", ".git", ".venv", ".device", "models", "build", "dist", "out", "*.egg-info",
             "__pycache__", ".pytest_cache", ".ruff_cache")


class PrepareError(Exception):
    """A bad input or a failed step, said in one line with what to do."""


def blocks(path: str) -> Iterator[bytes]:
    """A file's bytes, a MiB at a time (wheels are hundreds of MiB)."""
    with open(path, "rb") as f:
        while block := f.read(MIB):
            yield block


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    for block in blocks(path):
        digest.update(block)
    return digest.hexdigest()


def describe(path: str) -> dict[str, Any]:
    """A file as the manifest records it: exact name, size, sha256."""
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path),
            "sha256": sha256_file(path)}


def tree_bytes(root: str, left_behind: tuple[str, ...] = LEFT_BEHIND) -> int:
    """Bytes of the working tree that travels with every call (tracked files and untracked
    files git does not ignore), without the folders the device run leaves behind."""
    listed = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, check=True).stdout
    paths = {p.decode() for p in listed.split(b"\0") if p}
    return sum(os.path.getsize(os.path.join(root, p)) for p in paths
               if not p.startswith(left_behind) and os.path.isfile(os.path.join(root, p)))


def piece_size(tree: int, whole: int, limit: int = CALL_LIMIT, margin: int = MARGIN,
               unit: int = MIB) -> int:
    """The largest piece (a multiple of ``unit``) that fills one call beside the tree; the
    wheels that travel whole (``whole`` bytes) must fit one call too (the last: they ride with
    the smallest pieces, :func:`group_pieces`)."""
    size = (limit - tree - margin) // unit * unit
    if size <= 0 or whole > limit - tree - margin:
        raise PrepareError(f"the tree ({tree / MIB:.1f} MiB) and the whole wheels "
                           f"({whole / MIB:.1f} MiB) leave no room in a {limit / MIB:.0f} MiB "
                           "call; run from a tree without tests/fixtures/ and large untracked "
                           "files")
    return size


def group_pieces(sizes: dict[str, int], last_bytes: int, capacity: int) -> list[list[str]]:
    """Piece folders (their bytes) -> the folders each call carries, in few calls: the last
    call (it also carries ``last_bytes``: whl/) takes the smallest pieces that fit beside
    whl/, the others go first-fit by decreasing size into calls of ``capacity`` bytes."""
    if last_bytes > capacity or any(b > capacity for b in sizes.values()):
        raise PrepareError("a piece or the whl/ folder does not fit one device call; give a "
                           "smaller --piece-mib")
    last, room = [], capacity - last_bytes
    for folder in sorted(sizes, key=lambda f: (sizes[f], f)):
        if sizes[folder] > room:
            break
        last.append(folder)
        room -= sizes[folder]
    calls: list[list[str]] = []
    free: list[int] = []
    for folder in sorted(set(sizes) - set(last), key=lambda f: (-sizes[f], f)):
        i = next((i for i, r in enumerate(free) if sizes[folder] <= r), len(calls))
        if i == len(calls):
            calls.append([])
            free.append(capacity)
        calls[i].append(folder)
        free[i] -= sizes[folder]
    return calls + [sorted(last)]


def quietly(command: list[str]) -> None:
    """Runs ``command``; its output only shows if it fails (setuptools and pip are chatty)."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        said = " ".join((done.stderr or done.stdout).split())[-800:]
        raise PrepareError(f"{' '.join(command[:4])} ... failed (exit {done.returncode}): {said}")


def wheel_name(spec: str) -> tuple[str, str]:
    """'open_clip_torch==3.3.0' -> ('open_clip_torch', '3.3.0'), the name normalised as wheel
    file names spell it."""
    name, _, version = spec.partition("==")
    return re.sub(r"[-_.]+", "_", name).lower(), version


def downloaded(spec: str, folder: str) -> str:
    """The wheel file in ``folder`` that ``spec`` (name==version) downloaded."""
    name, version = wheel_name(spec)
    found = [f for f in sorted(os.listdir(folder)) if f.endswith(".whl")
             and f.lower().startswith(f"{name}-{version}-")]
    if len(found) != 1:
        raise PrepareError(f"{folder}: expected one wheel of {spec}, found {found or 'none'}; "
                           "empty the folder and run again")
    return os.path.join(folder, found[0])


def download(folder: str) -> list[str]:
    """WHEELS for the device's Python and platform, without their dependencies (the image has
    them); a wheel already in ``folder`` is not fetched again."""
    os.makedirs(folder, exist_ok=True)
    quietly([sys.executable, "-m", "pip", "download", "--no-deps", *DEVICE_TARGET, "-d", folder,
             *WHEELS])
    return [downloaded(spec, folder) for spec in WHEELS]


def build_project_wheel(root: str, folder: str) -> str:
    """This project's wheel (``pip wheel --no-deps``) into ``folder``, built from a copy of the
    sources so that the checkout gets no build/ or egg-info of it. Needs setuptools here."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="resclip-wheel-") as scratch:
        source, built = os.path.join(scratch, "src"), os.path.join(scratch, "wheel")
        shutil.copytree(root, source, ignore=shutil.ignore_patterns(*NOT_BUILT), symlinks=True)
        quietly([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                 built, source])
        [name] = os.listdir(built)
        target = os.path.join(folder, name)
        shutil.move(os.path.join(built, name), target)
    return target


def split(path: str, size: int, folders: list[str]) -> list[dict[str, Any]]:
    """``path`` cut into pieces of ``size`` bytes (the last shorter), piece i into folders[i],
    named <wheel file>.partNN -> each piece as the manifest records it."""
    pieces = []
    with open(path, "rb") as f:
        for number, folder in enumerate(folders, 1):
            block = f.read(size)
            assert block, "more folders than pieces"
            os.makedirs(folder, exist_ok=True)
            piece = os.path.join(folder, f"{os.path.basename(path)}.part{number:02d}")
            with open(piece, "wb") as out:
                out.write(block)
            pieces.append({**describe(piece), "folder": folder})
        assert not f.read(1), "fewer folders than pieces"
    return pieces


def pack(wheels: list[str], out: str, root: str, size: int) -> dict[str, Any]:
    """Lay out ``wheels`` under ``out`` for the calls: each one bigger than WHOLE_MAX split into
    pieces of ``size`` bytes, one folder each (p1, p2, ...), the rest whole in whl/ with the
    manifest. Folders in the manifest are relative to ``root`` (carry paths are)."""
    for old in os.listdir(out) if os.path.isdir(out) else []:
        if old == "whl" or re.fullmatch(r"p\d+", old):
            shutil.rmtree(os.path.join(out, old))
    whl = os.path.join(out, "whl")
    os.makedirs(whl)
    manifest: dict[str, Any] = {"piece_bytes": size, "whole": [], "split": [],
                                "folder": os.path.relpath(whl, root)}
    number = 0
    for wheel in wheels:
        if os.path.getsize(wheel) <= WHOLE_MAX:
            shutil.copy2(wheel, whl)
            manifest["whole"].append(describe(wheel))
            continue
        count = -(-os.path.getsize(wheel) // size)
        folders = [os.path.join(out, f"p{number + i}") for i in range(1, count + 1)]
        number += count
        pieces = split(wheel, size, folders)
        for piece in pieces:
            piece["folder"] = os.path.relpath(piece["folder"], root)
        manifest["split"].append({**describe(wheel), "pieces": pieces})
    with open(os.path.join(whl, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
               for f in files)


def plan_calls(manifest: dict[str, Any], root: str, capacity: int) -> list[dict[str, Any]]:
    """The device calls, in order, each carrying at most ``capacity`` bytes besides the tree
    (:func:`group_pieces`): each but the last carries piece folders and moves their pieces out
    of the repository copy there (a later call's transfer may replace its ignored paths); the
    last carries the remaining pieces and whl/, reassembles, installs and runs the check.
    ``prepare`` are its shell steps, ``check`` the check itself (the last call only),
    ``diagnose`` what the first call also asks about the image."""
    folders = [p["folder"] for wheel in manifest["split"] for p in wheel["pieces"]]
    whl = manifest["folder"]
    groups = group_pieces({f: folder_bytes(os.path.join(root, f)) for f in folders},
                          folder_bytes(os.path.join(root, whl)), capacity)
    calls = []
    for number, group in enumerate(groups[:-1], 1):
        steps = [f"mkdir -p {PIECES_HOME}", f"mv {' '.join(f + '/*' for f in group)} "
                 f"{PIECES_HOME}/", f"ls -l {PIECES_HOME}"]
        calls.append({"carry": group, "prepare": steps, "timeout_s": MOVE_TIMEOUT_S})
        if number == 1:
            calls[0]["diagnose"] = DIAGNOSE
    last = groups[-1]
    assemble = (f"python3 scripts/prepare_device.py --assemble {whl}/{MANIFEST} --pieces "
                f"{PIECES_HOME} {' '.join(last)} --into {whl}")
    calls.append({"carry": [*last, whl], "prepare": [assemble] if folders else [],
                  "check": f"WHEELS={whl} {CHECK}", "timeout_s": CHECK_TIMEOUT_S})
    for call in calls:
        steps = " && ".join([*call["prepare"], *([call["check"]] if "check" in call else [])])
        call["command"] = (("set -o pipefail; " if "check" in call else "") + steps
                           + (f" && {call['diagnose']}" if "diagnose" in call else ""))
        call["carried_bytes"] = sum(folder_bytes(os.path.join(root, c)) for c in call["carry"])
    return calls


def locate(name: str, folders: list[str]) -> Optional[str]:
    for folder in folders:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def assemble_one(wheel: dict[str, Any], folders: list[str], into: str) -> str:
    """One split wheel joined into ``into`` under its exact name, every piece and the whole
    checked against the manifest; on a mismatch nothing is left written."""
    target = os.path.join(into, wheel["file"])
    if os.path.isfile(target) and sha256_file(target) == wheel["sha256"]:
        return target
    found = {p["file"]: locate(p["file"], folders) for p in wheel["pieces"]}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise PrepareError(f"{', '.join(missing)} not found in {', '.join(folders)}; carry "
                           "the missing pieces again (a fresh machine has none of them)")
    for piece in wheel["pieces"]:
        got = sha256_file(found[piece["file"]])
        if got != piece["sha256"]:
            raise PrepareError(f"{found[piece['file']]}: sha256 {got} is not the manifest's "
                               f"{piece['sha256']}; carry this piece again")
    partial = os.path.join(into, f".{wheel['file']}.partial")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for piece in wheel["pieces"]:
                for block in blocks(found[piece["file"]]):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != wheel["sha256"]:
            raise PrepareError(f"{wheel['file']}: the joined pieces have sha256 "
                               f"{digest.hexdigest()}, not the manifest's {wheel['sha256']}; "
                               "prepare and carry the pieces again")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def assemble(manifest_path: str, folders: list[str], into: str) -> list[str]:
    """Every split wheel of the manifest joined into ``into`` -> their paths."""
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise PrepareError(f"{manifest_path}: cannot read the manifest ({e}); carry "
                           "the whl/ folder scripts/prepare_device.py made") from e
    os.makedirs(into, exist_ok=True)
    return [assemble_one(wheel, folders, into) for wheel in manifest["split"]]


def prepare(out: str, root: str,
            piece_mib: Optional[int]) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
    """Download, build, pack, plan -> (the calls, the tree's bytes, the manifest); the calls
    are also written to <out>/plan.json."""
    if os.path.relpath(os.path.abspath(out), root).startswith(os.pardir):
        raise PrepareError(f"--out {out}: must be inside the repository ({root}), where the "
                           "device tool carries paths from")
    ignored = subprocess.run(["git", "-C", root, "check-ignore", "-q", os.path.abspath(out)])
    if ignored.returncode != 0:     # else every call would carry every piece
        raise PrepareError(f"--out {out}: git does not ignore it; add it to .gitignore")
    cache = os.path.join(out, "cache")
    wheels = download(cache)
    for old in os.listdir(cache):    # an older build of this project would sit beside the new
        if old.startswith("resclip_deploy-"):
            os.unlink(os.path.join(cache, old))
    wheels.append(build_project_wheel(root, cache))
    tree = tree_bytes(root)
    whole = sum(os.path.getsize(w) for w in wheels if os.path.getsize(w) <= WHOLE_MAX)
    size = piece_mib * MIB if piece_mib else piece_size(tree, whole)
    manifest = pack(wheels, out, root, size)
    calls = plan_calls(manifest, root, CALL_LIMIT - tree - MARGIN)
    for call in calls:
        if call["carried_bytes"] + tree > CALL_LIMIT or len(call["command"]) > COMMAND_MAX:
            raise PrepareError(f"a call carrying {call['carry']} does not fit one device call; "
                               "give a smaller --piece-mib")
    with open(os.path.join(out, "plan.json"), "w", encoding="utf-8") as f:
        json.dump({"tree_bytes": tree, "calls": calls}, f, indent=1)
    return calls, tree, manifest


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, ".device"),
                        help="where the wheels, pieces and manifest go (an ignored folder of "
                             "the repository; default .device)")
    parser.add_argument("--piece-mib", type=int, default=None,
                        help="piece size (default: the most one call has room for)")
    parser.add_argument("--assemble", metavar="MANIFEST",
                        help="on the device: join the pieces this manifest lists")
    parser.add_argument("--pieces", nargs="+", default=[],
                        help="with --assemble: the folders holding the pieces")
    parser.add_argument("--into", help="with --assemble: where the joined wheels go")
    args = parser.parse_args(argv)
    try:
        if args.assemble:
            if not args.into or not args.pieces:
                raise PrepareError("--assemble needs --pieces DIR... and --into DIR")
            for path in assemble(args.assemble, args.pieces, args.into):
                print(f"assembled {path}: sha256 as in the manifest")
            return 0
        calls, tree, manifest = prepare(args.out, ROOT, args.piece_mib)
    except (PrepareError, subprocess.CalledProcessError, OSError) as e:
        print(f"prepare_device: {e}", file=sys.stderr)
        return 1
    print(f"tree without {', '.join(LEFT_BEHIND)}: {tree / MIB:.2f} MiB; pieces of "
          f"{manifest['piece_bytes'] / MIB:.0f} MiB; {len(calls)} calls, back to back (a machine "
          "stays warm 30 s after a call):")
    for wheel in manifest["split"]:
        print(f"  {wheel['file']}: {wheel['bytes']} bytes, sha256 {wheel['sha256']}, "
              f"{len(wheel['pieces'])} pieces")
    for number, call in enumerate(calls, 1):
        print(f"call {number}: carries {call['carried_bytes'] / MIB:.2f} MiB")
        print(json.dumps({"carry": call["carry"], "command": call["command"],
                          "timeout_s": call["timeout_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
