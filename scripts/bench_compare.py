"""resclip-bench on an older revision and on this tree, alternating processes, same bundle and
image: per-round lines and the medians over rounds side by side with new/old ratios.

    python scripts/bench_compare.py --old-rev b55bc6e --bundle models/ade20k --size 336x448

The older revision is unpacked from git into a temporary folder laid out as the installed
package (resclip_deploy with its export and runtime sub-packages) and put first on PYTHONPATH;
this tree runs as installed. The machine's noise drifts between hours, not between neighbouring
processes: alternate, and compare the medians.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unpack(rev: str, into: str) -> str:
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "resclip_deploy", "export",
                              "runtime"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    for sub in ("export", "runtime"):
        shutil.move(os.path.join(into, sub), os.path.join(into, "resclip_deploy", sub))
    return into


def one_run(args: argparse.Namespace, pythonpath: str, out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    subprocess.run(["resclip-bench", "--bundle", os.path.abspath(args.bundle), "--size",
                    args.size, "--runs", str(args.runs), "--no-reference", "--json", out],
                   env=env, check=True, capture_output=True, cwd=tempfile.gettempdir())
    with open(out, encoding="utf-8") as f:
        rt = json.load(f)["runtime"]
    st = rt["stages_s"]
    return {"total": rt["total_s"], "encoder": st["encoder"], "sfr": st["sfr"],
            "head": st["head"], "merge+output": st["merge"] + st["output"],
            "host": rt["host_s"], "up_MB": rt["bytes_to_device"] / 1e6,
            "down_MB": rt["bytes_to_host"] / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-rev", required=True)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--size", default="336x448")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "old"))
        paths = {"old": unpack(args.old_rev, os.path.join(tmp, "old")), "new": ""}
        for r in range(args.rounds):
            for which in ("old", "new") if r % 2 == 0 else ("new", "old"):
                row = one_run(args, paths[which], os.path.join(tmp, f"{which}.json"))
                results[which].append(row)
                print(r, which, {k: round(v, 3) for k, v in row.items()}, flush=True)
    print("median over rounds:")
    for key in results["old"][0]:
        old = statistics.median(x[key] for x in results["old"])
        new = statistics.median(x[key] for x in results["new"])
        ratio = f"{new / old:.2f}" if old else "-"
        print(f"  {key:13s} old {old:8.3f}  new {new:8.3f}  new/old {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
