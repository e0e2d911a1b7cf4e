"""Video through `resclip-segment --bundle` and the pipelined engine."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import CASES, CTRL_C_CHILD, FIXTURES

SEGMENT = str(Path(sys.executable).parent / "resclip-segment")
PHOTO = cv2.imread(str(FIXTURES / "images" / "astronaut.png"))          # BGR 512x512


def make_video(path, frames, size=(160, 224), fourcc="mp4v", fps=12.0):
    """Pan and zoom over the photo; returns the frames as written (BGR)."""
    h, w = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened()
    for i in range(frames):
        zoom = 1 + 0.05 * i
        ch, cw = int(360 / zoom), int(504 / zoom)
        y, x = 20 + 6 * i, 4 * i
        writer.write(cv2.resize(PHOTO[y:y + ch, x:x + cw], (w, h)))
    writer.release()


@pytest.fixture(scope="module")
def bundle(bundle_for):
    return bundle_for(next(c for c in CASES if c["name"] == "ade20k_chelsea"))


def run(bundle, *args, out):
    return subprocess.run([SEGMENT, *map(str, args), "-o", str(out), "--bundle", str(bundle),
                           "--device", "cpu", "-q"], capture_output=True, text=True, timeout=900)


def decoded_frames(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            return frames
        frames.append(frame)


def test_video_keeps_frames_size_and_rate_and_equals_image_segmentation(bundle, tmp_path):
    from resclip_deploy.runtime.segmenter import Segmenter
    make_video(tmp_path / "pan.mp4", 6)
    result = run(bundle, tmp_path / "pan.mp4", "--save-labels", "--save-frames",
                 out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    cap = cv2.VideoCapture(str(tmp_path / "out" / "pan_overlay.mp4"))
    assert cap.get(cv2.CAP_PROP_FRAME_COUNT) == 6
    assert (cap.get(cv2.CAP_PROP_FRAME_HEIGHT), cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == (160, 224)
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(12.0)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["images"][0]
    assert summary["frames_written"] == 6 and summary["frames_skipped_corrupt"] == 0
    seg = Segmenter.from_bundle(str(bundle), device="cpu")
    with np.load(tmp_path / "out" / "pan_labels.npz") as labels:
        assert labels.files == [f"frame_{i:06d}" for i in range(6)]
        for i, frame in enumerate(decoded_frames(tmp_path / "pan.mp4")):
            expected = seg.segment(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), with_probs=False)
            np.testing.assert_array_equal(labels[f"frame_{i:06d}"], expected.labels)
            png = cv2.imread(str(tmp_path / "out" / "pan_frames" / f"{i:06d}.png"),
                             cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(png, expected.labels)


def test_stream_url_keeps_its_first_frame(bundle, tmp_path):
    """A URL is read as a live stream (no rewinding): the frame read to check it is the first
    frame of the output, which equals reading the same video as a file."""
    make_video(tmp_path / "live.mp4", 4)
    for source, out in ((f"file://{tmp_path / 'live.mp4'}", "url"),
                        (tmp_path / "live.mp4", "file")):
        result = run(bundle, source, "--save-labels", out=tmp_path / out)
        assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "url" / "live_mp4_labels.npz") as url, \
            np.load(tmp_path / "file" / "live_labels.npz") as file:
        assert url.files == file.files == [f"frame_{i:06d}" for i in range(4)]
        for name in url.files:
            np.testing.assert_array_equal(url[name], file[name])


def test_engine_batches_frames_and_keeps_order(bundle):
    from resclip_deploy.runtime.segmenter import Segmenter
    from resclip_deploy.runtime.video import VideoEngine
    seg = Segmenter.from_bundle(str(bundle), device="cpu")
    rng = np.random.default_rng(0)
    frames = [(i, rng.integers(0, 256, (120, 170, 3), dtype=np.uint8)) for i in range(5)]
    for per_batch in (1, 3):
        out = list(VideoEngine(seg, frames_per_batch=per_batch).run(iter(frames)))
        assert [i for i, _, _ in out] == list(range(5))
        for (_, rgb), (_, _, result) in zip(frames, out):
            np.testing.assert_array_equal(result.labels,
                                          seg.segment(rgb, with_probs=False).labels)


def test_engine_batches_keep_the_encoder_outputs_for_the_head(bundle, monkeypatch):
    """Batches of frames go from the encoder to the head whole: what crosses host <-> device
    (in the GPU configuration) per frame is what an image moves, never the tokens or the RCS
    map (the old engine fetched and re-sent them for every batch)."""
    from resclip_deploy.runtime import segmenter
    from resclip_deploy.runtime.segmenter import Segmenter
    from resclip_deploy.runtime.video import VideoEngine
    # one output run per batch, as a GPU's bands hold three such frames (the CPU's are smaller)
    monkeypatch.setattr(segmenter, "CPU_OUTPUT_BAND_BYTES", segmenter.OUTPUT_BAND_BYTES)
    seg = Segmenter.from_bundle(str(bundle), device="cpu")
    rng = np.random.default_rng(1)
    frames = [(i, rng.integers(0, 256, (120, 170, 3), dtype=np.uint8)) for i in range(6)]
    seg.segment(frames[0][1], with_probs=False)
    seg.io = type(seg.io)()
    seg.segment(frames[0][1], with_probs=False)
    per_image = seg.io
    seg.io = type(seg.io)()
    list(VideoEngine(seg, frames_per_batch=3).run(iter(frames)))
    # batches of up to 3 frames (as many as are ready), four graphs each (encoder, SFR
    # matrix, head, output: one output run for all frames of a batch)
    assert seg.io.runs % 4 == 0 and 8 <= seg.io.runs <= 24
    batches = seg.io.runs // 4
    # per frame what an image moves, but the output's rows once per batch (cols went up with
    # the first image of this size)
    rows, _ = seg._merge_matrices(seg.prepare(frames[0][1]))
    merge = rows.nbytes
    assert seg.io.to_device == 6 * (per_image.to_device - merge) + batches * merge
    assert seg.io.to_host == 6 * per_image.to_host


def test_stopping_early_waits_for_every_stage(bundle):
    """After the consumer stops (Ctrl-C, an error), no engine thread still reads the source or
    runs a graph: the caller may release the capture and the sessions right away."""
    import threading
    from resclip_deploy.runtime.segmenter import Segmenter
    from resclip_deploy.runtime.video import THREAD_PREFIX, VideoEngine
    seg = Segmenter.from_bundle(str(bundle), device="cpu")
    rng = np.random.default_rng(1)
    drawn = []

    def source():
        for i in range(50):
            drawn.append(i)
            yield i, rng.integers(0, 256, (120, 170, 3), dtype=np.uint8)

    results = VideoEngine(seg).run(source())
    next(results)
    results.close()
    assert not [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]
    taken = len(drawn)
    time.sleep(0.3)
    assert len(drawn) == taken < 50


def test_smoothing_blends_frames(bundle):
    from resclip_deploy.runtime.segmenter import Segmenter
    from resclip_deploy.runtime.video import VideoEngine
    seg = Segmenter.from_bundle(str(bundle), device="cpu")
    rgb = cv2.cvtColor(cv2.resize(PHOTO, (200, 150)), cv2.COLOR_BGR2RGB)
    frames = [(0, rgb), (1, rgb[:, ::-1].copy())]
    plain = [r for _, _, r in VideoEngine(seg).run(iter(frames))]
    smooth = [r for _, _, r in VideoEngine(seg, smoothing=0.5).run(iter(frames))]
    np.testing.assert_array_equal(smooth[0].labels, plain[0].labels)
    p0 = seg.segment(frames[0][1]).probs
    p1 = seg.segment(frames[1][1]).probs
    np.testing.assert_allclose(smooth[1].probs, 0.5 * p0 + 0.5 * p1, atol=1e-6)
    with pytest.raises(Exception, match="--smooth"):
        VideoEngine(seg, smoothing=1.0)


def test_unreadable_videos_are_clear_errors(bundle, tmp_path):
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "empty.avi").write_bytes(b"")
    for name in ("garbage.mp4", "empty.avi", "missing.mp4"):
        result = run(bundle, tmp_path / name, out=tmp_path / "out")
        assert result.returncode == 1, (name, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and name in lines[0], result.stderr
    result = subprocess.run([SEGMENT, str(tmp_path / "garbage.mp4"), "-o", str(tmp_path / "o"),
                             "--reference", "--pretrained", "x.pt", "--preset", "voc20"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--bundle" in result.stderr


def test_truncated_video_writes_the_frames_it_has(bundle, tmp_path):
    make_video(tmp_path / "full.avi", 8, fourcc="MJPG")
    data = (tmp_path / "full.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: int(len(data) * 0.6)])
    result = run(bundle, tmp_path / "cut.avi", out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["images"][0]
    assert 1 <= summary["frames_written"] < 8
    assert len(decoded_frames(tmp_path / "out" / "cut_overlay.mp4")) == summary["frames_written"]


def test_ctrl_c_finishes_a_playable_video(bundle, tmp_path):
    make_video(tmp_path / "long.mp4", 40)
    out = tmp_path / "out"
    proc = subprocess.Popen([SEGMENT, str(tmp_path / "long.mp4"), "-o", str(out), "--bundle",
                             str(bundle), "--device", "cpu", "--save-labels"],
                            stderr=subprocess.PIPE, text=True, **CTRL_C_CHILD)
    deadline = time.time() + 300
    buffer = ""
    while "frames: 3" not in buffer:          # progress line on stderr
        assert proc.poll() is None and time.time() < deadline, buffer
        buffer += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    summary = json.loads((out / "summary.json").read_text())["images"][0]
    assert summary["interrupted"] and 3 <= summary["frames_written"] < 40
    assert len(decoded_frames(out / "long_overlay.mp4")) == summary["frames_written"]
    with np.load(out / "long_labels.npz") as labels:
        assert len(labels.files) == summary["frames_written"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
