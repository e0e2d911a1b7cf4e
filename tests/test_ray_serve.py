"""resclip-serve --ray: a real Ray Serve deployment (local Ray, 2 CPUs, two replicas of one CPU
each, batching concurrent requests) serving the same app: labels equal to Segmenter.segment,
bad input refused, and a replica killed during a bounded load run: every answered request
correct, the service back to two replicas and answering. Every process of the service's
session is gone after it stops."""

import os
import re
import signal
import threading
import time

import cv2
import numpy as np
import pytest

from conftest import CASES, case_image
from resclip_deploy.serve_bench import (Client, ServiceProcess, get, load_level,
                                        session_processes)


def replicas(server):
    return sorted(pid for pid, cmd in session_processes(server.proc.pid)
                  if cmd.startswith("ray::ServeReplica"))


def wait_for(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s} s")


@pytest.fixture(scope="module")
def ray_server(bundle_for):
    case = CASES[0]
    # --max-batch 2: the load below goes through Ray Serve's batching in each replica
    server = ServiceProcess(str(bundle_for(case)), "--ray", "--replicas", "2",
                            "--cpus-per-replica", "1", "--device", "cpu", "--max-batch", "2",
                            env={"RAY_USAGE_STATS_ENABLED": "0"}, ready_timeout_s=300)
    try:
        wait_for(lambda: len(replicas(server)) == 2, 120, "two replicas up")
        yield server, bundle_for(case), case
    finally:
        server.stop()
        left = session_processes(server.proc.pid)
        assert not left, f"processes of the Ray service left running: {left}"


def photo(case):
    ok, buf = cv2.imencode(".png", cv2.imread(str(case_image(case))))
    assert ok
    return buf.tobytes()


def expected_png(bundle, data):
    from resclip_deploy.io import decode_image, label_png_bytes
    from resclip_deploy.runtime.segmenter import Segmenter
    seg = Segmenter.from_bundle(str(bundle), device="cpu")
    result = seg.segment(decode_image(data, "test"), with_probs=False)
    return label_png_bytes(result.labels, len(result.class_names)), result


def test_ray_replicas_answer_like_the_segmenter(ray_server):
    server, bundle, case = ray_server
    data = photo(case)
    want, result = expected_png(bundle, data)
    client = Client(server.url)
    try:
        status, body = client.segment(data)
        assert status == 200 and body == want
        status, body = client.segment(b"plain text, not an image")
        assert status == 415, body
        status, body = client.segment(data, "?classes=cat,dog")
        assert status == 400 and b"fixed vocabulary" in body
    finally:
        client.close()
    status, info = get(server.url + "/v1/info")
    assert status == 200 and b'"classes"' in info
    # both replicas answer under four clients, every answer right, and concurrent requests
    # share graph runs (Ray Serve's batching, up to 2 per replica)
    row = load_level(server.url, data, want, 4, 12)
    assert row["ok"] == 12, row
    batched = []
    for _ in range(8):                              # /metrics answers from either replica
        status, text = get(server.url + "/metrics")
        assert status == 200
        counts = dict(re.findall(r'^resclip_batch_images_(count|bucket\{le="1.0"\}) (\S+)',
                                 text.decode(), re.M))
        batched.append(float(counts["count"]) - float(counts['bucket{le="1.0"}']))
    assert max(batched) > 0, batched
    assert cv2.imdecode(np.frombuffer(want, np.uint8), cv2.IMREAD_UNCHANGED).tolist() == \
        result.labels.tolist()


def test_a_replica_killed_during_load(ray_server):
    """Two clients, 24 requests, one replica SIGKILLed after the first answers: what was
    answered 200 is right, what failed is a 5xx of a request the dead replica held (at most
    one per client), and Ray brings the service back to two replicas that answer."""
    server, bundle, case = ray_server
    data = photo(case)
    want, _ = expected_png(bundle, data)
    before = replicas(server)
    assert len(before) == 2
    result = {}
    load = threading.Thread(target=lambda: result.update(
        load_level(server.url, data, want, 2, 24)))
    load.start()
    time.sleep(3)
    os.kill(before[0], signal.SIGKILL)
    load.join(240)
    assert not load.is_alive(), "the load run did not end in 240 s"
    assert "wrong labels" not in result["failures"], result
    assert all(k.startswith("5") for k in result["failures"]), result
    assert sum(result["failures"].values()) <= 2 and result["ok"] >= 22, result
    wait_for(lambda: len(replicas(server)) == 2 and before[0] not in replicas(server), 120,
             "Ray restarting the killed replica")
    after = load_level(server.url, data, want, 2, 4)
    assert after["ok"] == 4, after


def test_segment_groups_batches_per_vocabulary_and_isolates_errors(bundle_for):
    """What a replica runs on each gathered batch: one segment_many per segmenter (one per
    vocabulary), each answer the image segmented alone, an image the segmenter refuses gets
    its own error and the others their results. (Ray Serve's batching itself runs only in a
    replica: the deployment above answers through it.)"""
    from resclip_deploy.errors import UserError
    from resclip_deploy.ray_serve import segment_groups
    from resclip_deploy.runtime.segmenter import Segmenter

    seg = Segmenter.from_bundle(str(bundle_for(CASES[0])), device="cpu")
    other = Segmenter.from_bundle(str(bundle_for(CASES[0])), device="cpu")
    calls = []

    def spy(segmenter):
        original = segmenter.segment_many

        def segment_many(rgbs, with_probs=True):
            calls.append((id(segmenter), len(rgbs)))
            return original(rgbs, with_probs)
        segmenter.segment_many = segment_many

    spy(seg)
    spy(other)
    rgb = cv2.cvtColor(cv2.imread(str(case_image(CASES[0]))), cv2.COLOR_BGR2RGB)
    images = [rgb, rgb[:200, :300], rgb[50:, 40:]]
    results = segment_groups([(seg, images[0]), (other, images[1]), (seg, images[2])])
    assert sorted(calls) == sorted([(id(seg), 2), (id(other), 1)]), calls
    for image, got in zip(images, results):
        np.testing.assert_array_equal(got.labels, seg.segment(image, with_probs=False).labels)
    calls.clear()
    bad = np.zeros((1, 2000, 3), np.uint8)                  # too thin for one patch
    results = segment_groups([(seg, images[0]), (seg, bad)])
    assert isinstance(results[1], UserError), results[1]
    np.testing.assert_array_equal(results[0].labels,
                                  seg.segment(images[0], with_probs=False).labels)
