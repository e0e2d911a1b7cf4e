"""The device check's CPU side: run from this project's wheel as the device runs it, it exports,
runs every provider it finds and writes its report as it goes (on this GPU-less machine: the CPU
provider only, a tiny model); its preflight reports instead of failing without a GPU."""

import json
import os
import site
import subprocess
import sys

import pytest

from test_prepare_device import ROOT, prep

from resclip_deploy.export import device_check, device_preflight


def wheel_only_python(tmp_path):
    """-> the bin folder of an interpreter that can get resclip_deploy from nowhere but an
    installed wheel: a fresh venv whose one .pth file lists this environment's site-packages
    for the dependencies. Folders listed in a .pth file are put on sys.path without reading
    their own .pth files, so the editable install's finder stays out."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = str(env / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True,
                             check=True).stdout.strip()
    with open(os.path.join(purelib, "dependencies.pth"), "w", encoding="utf-8") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    return str(env / "bin")


@pytest.mark.slow
def test_device_check_runs_from_the_wheel_on_the_cpu(tmp_path):
    wheels, target, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "check.json"
    prep.build_project_wheel(ROOT, str(wheels))
    bin_dir = wheel_only_python(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=bin_dir + os.pathsep + env["PATH"], PYTHONNOUSERSITE="1",
               WHEELS=str(wheels), RESCLIP_SITE=str(target))
    finders = json.loads(subprocess.run(        # what resolves imports there, by module
        ["python3", "-c", "import json, sys; print(json.dumps([getattr(f, '__module__', '') "
         "for f in sys.meta_path]))"], capture_output=True, text=True, env=env,
        check=True).stdout)
    assert not [m for m in finders if m.startswith("__editable__")], finders

    result = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "device_check.sh"), "--cpu-only", "--tiny",
         "--frames", "3", "--runs", "1", "-o", str(out)],
        capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    report = lines[-1]
    assert json.loads(out.read_text()) == report and report["complete"]
    assert report["package"] == str(target / "resclip_deploy")     # the wheel's, not the source
    assert lines[0] == {"preflight": report["preflight"]}
    preflight = report["preflight"]
    assert preflight["onnxruntime"]["file"].endswith(os.path.join("onnxruntime", "__init__.py"))
    assert preflight["cuda_session"].get("add_correct") or "error" in preflight["cuda_session"]
    assert "gpus" in preflight["nvidia_smi"] or "error" in preflight["nvidia_smi"]
    # ADE20K by default; a line for each export, run and fused chain as it finished
    assert [(c["case"], c["precision"]) for c in report["cases"]] == [("ade20k", "fp32"),
                                                                      ("ade20k", "fp16")]
    assert [next(k for k in ("export_s", "run", "fused") if k in e) for e in lines[1:-1]] == \
        ["export_s", "run", "fused"] * 2
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


@pytest.mark.parametrize("names, cases", [(None, ["ade20k"]), (["voc20"], ["voc20"]),
                                          (["all"], ["ade20k", "voc20"]),
                                          (["voc20", "ade20k"], ["ade20k", "voc20"])])
def test_case_selection(names, cases):
    assert [c[0] for c in device_check.selected_cases(names)] == cases


def test_the_report_file_holds_each_state_whole(tmp_path, capsys):
    path = tmp_path / "report.json"
    report = {"complete": False, "cases": []}
    save = device_check.reporter(report, str(path))
    save({"preflight": {}})
    assert json.loads(path.read_text()) == {"complete": False, "cases": []}
    report["cases"].append({"case": "ade20k", "runs": [{"device": "cpu"}]})
    save({"run": {"device": "cpu"}})
    assert json.loads(path.read_text())["cases"][0]["runs"] == [{"device": "cpu"}]
    assert os.listdir(tmp_path) == ["report.json"]              # no partial file left beside
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [{"preflight": {}}, {"run": {"device": "cpu"}}]


def test_preflight_reports_without_a_gpu(tmp_path):
    result = device_check.run_preflight(str(tmp_path))
    assert "error" not in result, result
    assert result["onnxruntime"]["version"] == __import__("onnxruntime").__version__
    assert "CPUExecutionProvider" in result["available_providers"]
    session = result["cuda_session"]
    assert session["add_correct"] and "CPUExecutionProvider" in session["providers"]
    assert session["cuda_bound"] == ("CUDAExecutionProvider" in session["providers"])
    assert result["preload_dlls"]["present"] == hasattr(__import__("onnxruntime"),
                                                        "preload_dlls")
    assert "gpus" in result["nvidia_smi"] or "error" in result["nvidia_smi"]
    # numba-cuda (the tests run its simulator, which the report says)
    numba = result["numba_cuda"]
    assert numba["version"] and numba["simulator"] and numba["available"], numba
    assert numba["add_correct"]


def test_preflight_parsers():
    assert device_preflight.parse_gpus("NVIDIA H100 80GB HBM3, 81559, 580.159.03\n") == [
        {"name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559.0, "driver": "580.159.03"}]
    maps = ("7f00-7f01 r-xp 00000000 08:01 12 /site/nvidia/cu13/lib/libcudart.so.13\n"
            "7f01-7f02 r--p 00001000 08:01 12 /site/nvidia/cu13/lib/libcudart.so.13\n"
            "7f02-7f03 r-xp 00000000 08:01 13 /usr/lib/libc.so.6\n"
            "7f03-7f04 rw-p 00000000 00:00 0 \n")
    assert device_preflight.mapped_libraries(maps) == {
        "libcudart.so.13": "/site/nvidia/cu13/lib/libcudart.so.13"}
