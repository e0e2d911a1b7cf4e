"""The CPU table of BENCHMARKS.md from one command: every preset x precision x runtime.

    python scripts/cpu_table.py --model ViT-B-16-quickgelu --pretrained b16.pt --work bundles/

Exports the fp32, int8 (dynamic), int8-static and int8-weights bundles of each preset into
--work (kept and reused), then runs ``resclip-bench`` once per configuration, each in its own
process (its peak memory is its own), with the floor timed in the same process, and the labels
compared with the fp32 bundle on ONNX Runtime's CPU provider on the fixture photos. Prints a
markdown table and writes every report as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = [os.path.join(HERE, "..", "tests", "fixtures", "images", name)
          for name in ("astronaut.png", "chelsea.png")]
# preset -> the image size timed: ADE20K 6 windows, VOC20 one whole 336x448 window,
# Cityscapes short side 560 with 28 windows
SIZES = {"ade20k": "336x448", "voc20": "336x448", "city_scapes": "560x896"}
CONFIGS = [("fp32", "cpu"), ("fp32", "openvino"), ("fp32", "openvino-bf16"),
           ("int8", "cpu"), ("int8", "openvino"),
           ("int8-static", "cpu"), ("int8-static", "openvino"),
           ("int8-weights", "cpu"), ("int8-weights", "openvino")]


def export(args: argparse.Namespace, preset: str, precision: str) -> str:
    out = os.path.join(args.work, f"{preset}_{precision}")
    if not os.path.isdir(out):
        subprocess.run(["resclip-export", "--model", args.model, "--pretrained",
                        args.pretrained, "--preset", preset, "--precision", precision,
                        "-o", out, "-q"], check=True)
    return out


def bench(args: argparse.Namespace, preset: str, bundle: str, fp32: str, device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "report.json")
        cmd = ["resclip-bench", "--bundle", bundle, "--size", SIZES[preset], "--runs",
               str(args.runs), "--device", device, "--no-reference", "--json", path]
        if bundle != fp32 or device != "cpu":
            cmd += ["--against", fp32, *(a for p in PHOTOS for a in ("--agreement-image", p))]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(path) as f:
            return json.load(f)


def row(preset: str, precision: str, device: str, r: dict) -> str:
    s = r["runtime"]["stages_s"]
    # what the encoder ran on, as the runtime reports it (e.g. OpenVINO's int8 weight products)
    graph = "encoder" if "encoder" in r["providers"] else "segmenter"
    ran = r["providers"][graph][0]
    runtime = "ONNX Runtime" if ran == "CPUExecutionProvider" else \
        ran.replace("OpenVINO CPU ", "OpenVINO ")
    agree = r.get("agreement")
    cells = [preset, str(r["windows"]), precision, runtime, f"{s['encoder']:.3f}",
             f"{s['sfr']:.3f}", f"{s['head']:.3f}", f"{s['merge'] + s['output']:.3f}",
             f"{r['runtime']['total_s']:.3f}", f"{r['floor']['floor_s']:.3f}",
             f"**{r['floor']['ratio']:.2f}**", f"{r['runtime']['peak_rss_mb']:.0f}",
             "(baseline)" if agree is None else f"{100 * agree['all']:.2f} %"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--work", required=True, help="Folder for the bundles (kept, reused).")
    ap.add_argument("--presets", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    lines = ["| preset | windows | precision | runtime | encoder s | SFR s | head s | "
             "merge + output s | total s | floor s | total / floor | peak RSS MB | "
             "labels = fp32 |", "|" + "---|" * 13]
    reports = []
    for preset in args.presets:
        bundles = {p: export(args, preset, p) for p in dict.fromkeys(p for p, _ in CONFIGS)}
        for precision, device in CONFIGS:
            r = bench(args, preset, bundles[precision], bundles["fp32"], device)
            reports.append({"preset": preset, "precision": precision, "device": device, **r})
            lines.append(row(preset, precision, device, r))
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)


if __name__ == "__main__":
    main()
