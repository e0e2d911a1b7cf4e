"""The device check's CPU side: it exports, runs every provider it finds and prints one JSON
line (on this GPU-less machine: the CPU provider only, a tiny model)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_device_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "device_check.sh"), "--cpu-only", "--tiny",
         "--case", "voc20", "--frames", "3", "--runs", "1", "-o", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "WHEELS": str(tmp_path / "none"),
             "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1]
    report = json.loads(line)
    assert json.loads(out.read_text()) == report
    assert [(c["case"], c["precision"]) for c in report["cases"]] == [("voc20", "fp32"),
                                                                      ("voc20", "fp16")]
    for case in report["cases"]:
        [run] = case["runs"]
        assert run["device"] == "cpu" and run["image_s"] > 0
        assert set(run["stages_s"]) == {"preprocess", "encoder", "sfr", "head", "merge",
                                        "output"}
        assert run["video"]["frames"] == 3 and run["video"]["labels_identical"]
        assert run["stages"]["prepass"] == "numpy" and run["bytes_to_host"] > 0
        [chain] = case["fused"]                      # the one-graph chain, same labels
        assert "error" not in chain, chain
        assert chain["labels_vs_cpu_fp32"] >= (0.9999 if case["precision"] == "fp32" else 0.9)
    fp16 = report["cases"][1]["runs"][0]
    assert 0.9 <= fp16["labels_vs_cpu_fp32"] <= 1.0
