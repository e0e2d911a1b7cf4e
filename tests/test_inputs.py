"""Images people actually have, through `resclip-segment --bundle` as a new user runs it."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import CASES, FIXTURES

SEGMENT = str(Path(sys.executable).parent / "resclip-segment")
PHOTO = cv2.imread(str(FIXTURES / "images" / "chelsea.png"))          # BGR 300x451


@pytest.fixture(scope="module")
def slide_bundle(bundle_for):
    return bundle_for(next(c for c in CASES if c["name"] == "ade20k_chelsea"))


@pytest.fixture(scope="module")
def whole_bundle(bundle_for):
    return bundle_for(next(c for c in CASES if c["name"] == "voc20_chelsea_clip"))


def segment(bundle, *inputs, out, extra=()):
    return subprocess.run([SEGMENT, *map(str, inputs), "-o", str(out), "--bundle", str(bundle),
                           "--device", "cpu", "-q", *extra], capture_output=True, text=True,
                          timeout=600)


def labels_of(out, stem):
    return cv2.imread(str(out / f"{stem}.png"), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp", ".tif"])
def test_common_formats(slide_bundle, tmp_path, ext):
    path = tmp_path / f"photo{ext}"
    assert cv2.imwrite(str(path), PHOTO)
    result = segment(slide_bundle, path, out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert labels_of(tmp_path / "out", "photo").shape == PHOTO.shape[:2]
    assert (tmp_path / "out" / "photo_overlay.jpg").exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    entry = summary["images"][0]
    assert entry["size"] == list(PHOTO.shape[:2])
    assert abs(sum(entry["classes"].values()) - 1) < 1e-4
    assert summary["settings"]["connectivity"] == "reference"


def test_grayscale_rgba_and_16_bit_read_as_the_photo(slide_bundle, tmp_path):
    gray = cv2.cvtColor(PHOTO, cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    cv2.imwrite(str(tmp_path / "gray3.png"), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    rgba = cv2.cvtColor(PHOTO, cv2.COLOR_BGR2BGRA)
    rgba[..., 3] = 128
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    cv2.imwrite(str(tmp_path / "deep.png"), PHOTO.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "plain.png"), PHOTO)
    out = tmp_path / "out"
    result = segment(slide_bundle, *(tmp_path / f"{n}.png" for n in
                                     ("gray", "gray3", "rgba", "deep", "plain")), out=out)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(labels_of(out, "gray"), labels_of(out, "gray3"))
    np.testing.assert_array_equal(labels_of(out, "rgba"), labels_of(out, "plain"))
    np.testing.assert_array_equal(labels_of(out, "deep"), labels_of(out, "plain"))


def exif_orientation_jpeg(bgr, orientation):
    """A JPEG whose EXIF says 'rotate for display' (tag 0x0112)."""
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    tiff = b"MM\x00*\x00\x00\x00\x08" + struct.pack(">H", 1) + \
        struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + b"\x00\x00\x00\x00"
    app1 = b"Exif\x00\x00" + tiff
    data = buf.tobytes()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def test_exif_rotation_is_applied(slide_bundle, tmp_path):
    (tmp_path / "rotated.jpg").write_bytes(exif_orientation_jpeg(PHOTO, 6))
    (tmp_path / "upright.jpg").write_bytes(exif_orientation_jpeg(
        cv2.rotate(PHOTO, cv2.ROTATE_90_CLOCKWISE), 1))
    out = tmp_path / "out"
    result = segment(slide_bundle, tmp_path / "rotated.jpg", tmp_path / "upright.jpg", out=out)
    assert result.returncode == 0, result.stderr
    assert labels_of(out, "rotated").shape == (451, 300)       # displayed portrait
    agreement = (labels_of(out, "rotated") == labels_of(out, "upright")).mean()
    assert agreement > 0.98, agreement


def test_tiny_and_very_wide_images(slide_bundle, whole_bundle, tmp_path):
    cv2.imwrite(str(tmp_path / "tiny.png"), cv2.resize(PHOTO, (30, 20)))
    cv2.imwrite(str(tmp_path / "strip.png"), cv2.resize(PHOTO, (3000, 60)))
    for bundle in (slide_bundle, whole_bundle):
        out = tmp_path / bundle.name
        result = segment(bundle, tmp_path / "tiny.png", tmp_path / "strip.png", out=out)
        assert result.returncode == 0, result.stderr
        assert labels_of(out, "tiny").shape == (20, 30)
        assert labels_of(out, "strip").shape == (60, 3000)


def test_thinner_than_a_patch_is_a_clear_error_and_the_rest_runs(slide_bundle, tmp_path):
    cv2.imwrite(str(tmp_path / "thread.png"), cv2.resize(PHOTO, (3000, 8)))
    cv2.imwrite(str(tmp_path / "ok.png"), PHOTO)
    out = tmp_path / "out"
    result = segment(slide_bundle, tmp_path / "thread.png", tmp_path / "ok.png", out=out)
    assert result.returncode == 1
    assert "thread.png" in result.stderr and "thinner than one 16x16 patch" in result.stderr
    assert labels_of(out, "ok").shape == PHOTO.shape[:2]
    summary = json.loads((out / "summary.json").read_text())
    assert [f["input"] for f in summary["failed"]] == [str(tmp_path / "thread.png")]


def test_corrupt_and_truncated_files_are_named(slide_bundle, tmp_path):
    ok, buf = cv2.imencode(".jpg", PHOTO)
    (tmp_path / "truncated.jpg").write_bytes(buf.tobytes()[:200])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    cv2.imwrite(str(tmp_path / "good.png"), PHOTO)
    out = tmp_path / "out"
    result = segment(slide_bundle, *(tmp_path / n for n in
                                     ("truncated.jpg", "empty.png", "text.jpg", "good.png")),
                     out=out)
    assert result.returncode == 1
    for name in ("truncated.jpg", "empty.png", "text.jpg"):
        assert name in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good.png", "good_overlay.jpg",
                                                     "summary.json"]


def test_a_24_megapixel_photo_runs_in_bounded_memory(whole_bundle, tmp_path):
    big = cv2.resize(PHOTO, (6000, 4000), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(str(tmp_path / "big.jpg"), big)
    command = [SEGMENT, str(tmp_path / "big.jpg"), "-o", str(tmp_path / "o"), "--bundle",
               str(whole_bundle), "--device", "cpu", "-q"]
    code = ("import resource, subprocess, sys\n"
            f"r = subprocess.run({command!r})\n"
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    returncode, peak_mb = map(int, result.stdout.split())
    assert returncode == 0, result.stderr
    assert labels_of(tmp_path / "o", "big").shape == (4000, 6000)
    # One (queries, H, W) float32 tensor alone would be 30 x 24e6 x 4 B = 2.9 GB.
    assert peak_mb < 2000, peak_mb
