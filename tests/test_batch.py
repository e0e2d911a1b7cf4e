"""resclip-batch on a real local Ray (2 CPUs, two actors of one CPU): a folder with a corrupt
file in it and a video split into frame ranges. Outputs equal Segmenter.segment, the corrupt
file is recorded and skipped, a rerun only does what is missing, and no process of the run is
left behind."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import CASES, case_image
from resclip_deploy.serve_bench import session_processes
from test_video import decoded_frames, make_video

BATCH = str(Path(sys.executable).parent / "resclip-batch")


def run_batch(bundle, inputs, out):
    proc = subprocess.Popen([BATCH, *map(str, inputs), "--bundle", str(bundle), "-o", str(out),
                             "--device", "cpu", "--actors", "2", "--cpus-per-actor", "1",
                             "--frames-per-task", "2", "--save-frames"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ,
                                                         "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        for pid, _ in session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)
    return proc.returncode, err


def labels_of(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def batch_run(bundle_for, tmp_path_factory):
    case = CASES[0]
    bundle = bundle_for(case)
    root = tmp_path_factory.mktemp("batch")
    photos = root / "photos"
    photos.mkdir()
    image = cv2.imread(str(case_image(case)))
    cv2.imwrite(str(photos / "a.png"), image)
    cv2.imwrite(str(photos / "b.jpg"), cv2.resize(image, (160, 120)))
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    make_video(root / "pan.mp4", 5)
    out = root / "out"
    code, err = run_batch(bundle, [photos, root / "pan.mp4"], out)
    return bundle, photos, root / "pan.mp4", out, code, err


def test_batch_writes_what_the_segmenter_gives_and_records_the_corrupt_file(batch_run):
    from resclip_deploy.runtime.segmenter import Segmenter
    bundle, photos, video, out, code, err = batch_run
    assert code == 1, err                     # one input failed: exit 1, the rest written
    summary = json.loads((out / "summary.json").read_text())
    assert [e["input"] for e in summary["failed"]] == [str(photos / "corrupt.jpg")]
    assert "corrupt.jpg" in summary["failed"][0]["error"]
    assert sorted(e["input"] for e in summary["images"]) == sorted(
        [str(photos / "a.png"), str(photos / "b.jpg"), str(video)])
    seg = Segmenter.from_bundle(str(bundle), device="cpu")
    for name in ("a.png", "b.jpg"):
        rgb = cv2.cvtColor(cv2.imread(str(photos / name)), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(labels_of(out / f"{Path(name).stem}.png"),
                                      seg.segment(rgb, with_probs=False).labels)
        assert (out / f"{Path(name).stem}_overlay.jpg").is_file()
    # the video: three ranges of at most 2 frames, joined as resclip-segment writes a video
    frames = decoded_frames(video)
    assert len(decoded_frames(out / "pan_overlay.mp4")) == len(frames) == 5
    for i, frame in enumerate(frames):
        want = seg.segment(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), with_probs=False).labels
        np.testing.assert_array_equal(labels_of(out / "pan_frames" / f"{i:06d}.png"), want)
    entry = next(e for e in summary["images"] if e["input"] == str(video))
    assert entry["ranges"] == 3 and entry["frames_written"] == 5
    assert not (out / "pan_parts").exists()
    assert not [p for p in os.listdir(out) if p.startswith(".")]      # no temporary left


def test_batch_rerun_does_only_what_is_missing(batch_run):
    bundle, photos, video, out, _, _ = batch_run
    kept = {p: p.stat().st_mtime_ns for p in (out / "a.png", out / "pan_overlay.mp4")}
    (out / "b.png").unlink()
    code, err = run_batch(bundle, [photos, video], out)
    assert code == 1, err                     # the corrupt file fails again, nothing else
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_as_done"] == 2    # a.png and the video
    assert (out / "b.png").is_file()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert len(summary["images"]) == 3 and len(summary["failed"]) == 1


def test_batch_refuses_streams_and_a_missing_bundle(tmp_path):
    result = subprocess.run([BATCH, "rtsp://127.0.0.1:1/x", "--bundle", str(tmp_path / "none"),
                             "-o", str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
