"""resclip-serve against a real uvicorn process on a free loopback port: labels equal to
Segmenter.segment, every format, every limit and bad input, tokens, metrics, and a bounded load
run with bad requests mixed in."""

import base64
import concurrent.futures
import json
import os
import struct
import time
import zlib

import cv2
import numpy as np
import pytest

from conftest import CASES, case_image
from resclip_deploy.overlay import palette
from resclip_deploy.serve import rle_counts
from resclip_deploy.serve_bench import ServiceProcess

import httpx  # noqa: E402  (the [test] extra)


class Server(ServiceProcess):
    """``python -m resclip_deploy.serve`` on ONNX Runtime's CPU provider, in its own process
    group on a free loopback port; stopped by its id."""

    def __init__(self, bundle, *args, env=None):
        super().__init__(str(bundle), "--device", "cpu", *args, env=env)


@pytest.fixture(scope="module")
def fixed(bundle_for):
    case = CASES[0]
    server = Server(bundle_for(case), "--max-in-flight", "3")
    yield server, bundle_for(case), case
    server.stop()


def photo_bytes(case, ext=".png"):
    ok, buf = cv2.imencode(ext, cv2.imread(str(case_image(case))))
    assert ok
    return buf.tobytes()


def expected_labels(bundle, data):
    from resclip_deploy.io import decode_image
    from resclip_deploy.runtime.segmenter import Segmenter
    seg = Segmenter.from_bundle(str(bundle), device="cpu")
    return seg.segment(decode_image(data, "test"), with_probs=False)


def test_labels_equal_the_segmenter_in_every_format(fixed):
    server, bundle, case = fixed
    data = photo_bytes(case)
    want = expected_labels(bundle, data)
    r = httpx.post(server.url + "/v1/segment", content=data, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    png = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(png, want.labels)

    # multipart, JSON fractions
    r = httpx.post(server.url + "/v1/segment?format=json", files={"image": ("x.png", data)},
                   timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["classes"] == list(want.class_names)
    assert (body["height"], body["width"]) == want.labels.shape
    for name, fraction in body["fractions"].items():
        c = want.class_names.index(name)
        assert fraction == pytest.approx((want.labels == c).mean(), abs=1e-6)
    assert sum(body["fractions"].values()) == pytest.approx(1, abs=1e-4)
    colours = palette(len(want.class_names))     # the overlay's, for a client's own legend
    assert body["colors"] == {name: "#%02x%02x%02x" % tuple(colours[want.class_names.index(name)])
                              for name in body["fractions"]}

    # RLE masks rebuild the label map; overlay as base64 JPEG
    r = httpx.post(server.url + "/v1/segment?format=rle&overlay=true", content=data,
                   timeout=120)
    body = r.json()
    rebuilt = np.full(want.labels.shape, -1)
    for name, m in body["masks"].items():
        mask = decode_rle(m)
        assert not (rebuilt[mask] >= 0).any()
        rebuilt[mask] = want.class_names.index(name)
    np.testing.assert_array_equal(rebuilt, want.labels)
    jpeg = cv2.imdecode(np.frombuffer(base64.b64decode(body["overlay_jpeg"]), np.uint8),
                        cv2.IMREAD_COLOR)
    assert jpeg.shape[0] == want.labels.shape[0] and jpeg.shape[1] >= want.labels.shape[1]

    r = httpx.post(server.url + "/v1/segment?overlay=true", content=data, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"


def decode_rle(m):
    h, w = m["size"]
    counts = m["counts"]
    if isinstance(counts, str):
        from pycocotools import mask as coco_mask
        return coco_mask.decode({"size": [h, w], "counts": counts.encode()}).astype(bool)
    flat = np.zeros(h * w, bool)
    pos, value = 0, False
    for run in counts:
        flat[pos:pos + run] = value
        pos, value = pos + run, not value
    assert pos == h * w
    return flat.reshape((w, h)).T


def test_rle_counts_are_cocos_column_major_runs():
    mask = np.array([[1, 0, 0], [1, 1, 0]], bool)
    # column-major: 1 1 | 0 1 | 0 0 -> starts with a zero-length run of zeros
    assert rle_counts(mask) == [0, 2, 1, 1, 2]
    assert rle_counts(np.zeros((2, 2), bool)) == [4]
    assert decode_rle({"size": [2, 3], "counts": rle_counts(mask)}).tolist() == mask.tolist()


def png_header_only(width, height):
    """A PNG whose header declares width x height, with one tiny (wrong) IDAT."""
    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_bad_requests_get_a_4xx_naming_the_problem(fixed):
    server, _, case = fixed
    url = server.url + "/v1/segment"
    jpeg = photo_bytes(case, ".jpg")
    cases = [
        (b"", {}, 400, "no image"),
        (b"hello, this is text", {}, 415, "not an image"),
        (jpeg[:len(jpeg) // 2], {}, 400, "truncated"),
        (png_header_only(0, 0), {}, 4, ""),
        (png_header_only(50000, 50000), {}, 413, "pixels"),
        (png_header_only(8000, 6000), {}, 413, "48000000 pixels"),
        (jpeg, {"format": "tiff"}, 400, "format"),
        (jpeg, {"overlay": "maybe"}, 400, "overlay"),
        (jpeg, {"classes": "cat,dog"}, 400, "fixed vocabulary"),
    ]
    for body, params, status, words in cases:
        r = httpx.post(url, content=body, params=params, timeout=60)
        if status == 4:
            assert 400 <= r.status_code < 500, (r.status_code, r.text)
        else:
            assert r.status_code == status, (params, r.status_code, r.text)
        assert words in r.json()["error"], r.text
    r = httpx.post(url, files={"image": ("x.txt", b"abc")}, timeout=60)
    assert r.status_code == 415 and "not an image" in r.json()["error"]
    no_file = (b"--b\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n"
               b"--b--\r\n")
    r = httpx.post(url, content=no_file, timeout=60,
                   headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and "no file field 'image'" in r.json()["error"]
    r = httpx.post(url, content=b"--b\r\ngarbage", timeout=60,
                   headers={"content-type": "multipart/form-data; boundary=b"})
    assert 400 <= r.status_code < 500, r.text
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}


def test_info_and_metrics(fixed):
    server, bundle, _ = fixed
    info = httpx.get(server.url + "/v1/info").json()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert info["classes"] == manifest["vocabulary"]["class_names"]
    assert info["precision"] == "fp32" and info["runtime_classes"] is False
    assert info["providers"]["encoder"] == ["CPUExecutionProvider"]
    # what the bundle was made from, without this machine's paths: file names and checksums
    source = manifest["source"]
    assert os.path.isabs(source["file"]) and "/" not in info["model"]["file"]
    assert info["model"] == {**source, "file": os.path.basename(source["file"])}
    assert not any(isinstance(v, str) and os.sep in v for v in info["model"].values())
    metrics = httpx.get(server.url + "/metrics").text
    assert 'resclip_requests_total{endpoint="/v1/segment",status="200"}' in metrics
    assert "resclip_request_seconds_bucket" in metrics and "resclip_in_flight" in metrics
    assert 'resclip_errors_total{reason="http_415"}' in metrics


def test_bounded_load_with_bad_requests_mixed_in(fixed):
    """4 clients, 40 requests (a quarter of them bad), 300 s at most: every good request gets
    the right labels or a 503 to retry, every bad one its 4xx; the process stays up and its
    memory flat."""
    server, bundle, case = fixed
    data = photo_bytes(case)
    want = cv2.imencode(".png", expected_labels(bundle, data).labels)[1].tobytes()
    bad = [b"", b"text", png_header_only(50000, 50000)]
    deadline = time.monotonic() + 300

    def client(i):
        good = i % 4 != 3
        body = data if good else bad[i % len(bad)]
        while time.monotonic() < deadline:
            r = httpx.post(server.url + "/v1/segment", content=body, timeout=120)
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                time.sleep(0.2)
                continue
            return good, r.status_code, r.content
        raise AssertionError("request not answered in time")

    rss = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for start in range(0, 40, 8):
            for good, status, content in pool.map(client, range(start, start + 8)):
                if good:
                    assert status == 200
                    assert cv2.imdecode(np.frombuffer(content, np.uint8),
                                        cv2.IMREAD_UNCHANGED).tobytes() == \
                        cv2.imdecode(np.frombuffer(want, np.uint8),
                                     cv2.IMREAD_UNCHANGED).tobytes()
                else:
                    assert 400 <= status < 500
            rss.append(server.rss_mb())
    assert server.proc.poll() is None
    assert max(rss[1:]) - rss[1] < 100, rss


def test_limits_busy_timeout_and_size(bundle_for):
    case = CASES[0]
    data = photo_bytes(case)
    server = Server(bundle_for(case), "--max-in-flight", "1", "--timeout", "0.2",
                    "--max-request-mb", "0.05")
    try:
        big = photo_bytes(case, ".bmp")
        assert len(big) > 0.05 * (1 << 20)
        r = httpx.post(server.url + "/v1/segment", content=big, timeout=60)
        assert r.status_code == 413 and "bytes" in r.json()["error"]
        small = cv2.imencode(".jpg", cv2.imread(str(case_image(case))),
                             [cv2.IMWRITE_JPEG_QUALITY, 60])[1].tobytes()
        assert len(small) < 0.05 * (1 << 20) < len(data)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: httpx.post(server.url + "/v1/segment",
                                                         content=small, timeout=60), range(2)))
        codes = sorted(a.status_code for a in answers)
        assert codes in ([503, 504], [504, 504]), codes
        busy = [a for a in answers if a.status_code == 503]
        assert all(a.headers["retry-after"] == "1" for a in busy)
        assert all("took longer" in a.json()["error"] for a in answers if a.status_code == 504)
    finally:
        server.stop()


def test_token_is_required_when_given(bundle_for, tmp_path):
    token = "t0k3n-" + "x" * 20
    (tmp_path / "token").write_text(token + "\n")
    server = Server(bundle_for(CASES[0]), "--token-file", str(tmp_path / "token"))
    try:
        assert httpx.get(server.url + "/healthz").status_code == 200
        # the page holds no data: it and its files need no token, its API calls do
        page = httpx.get(server.url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self';" in page.headers["content-security-policy"]
        assert httpx.get(server.url + "/static/app.js").status_code == 200
        assert httpx.get(server.url + "/static/index.html").status_code == 404
        for path in ("/v1/info", "/metrics"):
            r = httpx.get(server.url + path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            r = httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
            r = httpx.get(server.url + path, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200
    finally:
        server.stop()


def test_listening_beyond_loopback_needs_a_token(bundle_for, tmp_path):
    from click.testing import CliRunner
    from resclip_deploy.serve import _serve_command
    bundle = str(bundle_for(CASES[0]))
    result = CliRunner().invoke(_serve_command(), [bundle, "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--token-file" in result.output
    assert "--insecure-no-token" in result.output
    (tmp_path / "short").write_text("abc")
    result = CliRunner().invoke(_serve_command(), [bundle, "--token-file",
                                                   str(tmp_path / "short")])
    assert result.exit_code == 2 and "at least 16" in result.output


def test_classes_per_request_never_leak(tiny_bundle):
    """A --text-encoder bundle: each request's vocabulary gives that vocabulary's labels, and
    the next request without classes gets the bundle's own again."""
    from resclip_deploy.io import decode_image
    from resclip_deploy.runtime.segmenter import Segmenter
    from resclip_deploy.vocab import parse_class_list
    server = Server(tiny_bundle)
    try:
        data = photo_bytes(CASES[0])
        rgb = decode_image(data, "test")
        seg = Segmenter.from_bundle(str(tiny_bundle), device="cpu")
        for spec in ("dog,grass|lawn,sky", None, "tree,road"):
            params = {"format": "json"} if spec is None else {"format": "json",
                                                              "classes": spec}
            body = httpx.post(server.url + "/v1/segment", content=data, params=params,
                              timeout=120).json()
            want = (seg if spec is None else seg.with_classes(parse_class_list(spec))) \
                .segment(rgb, with_probs=False)
            assert body["classes"] == list(want.class_names)
            got = {k: v for k, v in body["fractions"].items()}
            expect = {want.class_names[c]: (want.labels == c).mean()
                      for c in np.unique(want.labels)}
            assert got.keys() == expect.keys()
            for k in got:
                assert got[k] == pytest.approx(expect[k], abs=1e-6)
        r = httpx.post(server.url + "/v1/segment", content=data, params={"classes": ","})
        assert r.status_code == 400 and r.json()["error"].startswith("classes:")
    finally:
        server.stop()


def test_the_overlay_jpeg_is_the_clis(fixed, tmp_path):
    from resclip_deploy.io import decode_image, overlay_jpeg_bytes
    server, bundle, case = fixed
    data = photo_bytes(case)
    r = httpx.post(server.url + "/v1/segment?overlay=true", content=data, timeout=120)
    seg = expected_labels(bundle, data)
    assert r.content == overlay_jpeg_bytes(decode_image(data, "t"), seg)
