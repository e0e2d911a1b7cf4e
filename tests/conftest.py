import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "parity"
CASES = json.loads((PARITY / "cases.json").read_text())["cases"]
WEIGHTS = PARITY / "weights" / "rand-vit16-w192.pt"


def case_by_name(name):
    return next(c for c in CASES if c["name"] == name)


def load_case(case):
    with np.load(PARITY / case["file"]) as d:
        return {k: d[k] for k in d.files}


def case_image(case):
    return (PARITY / case["image"]).resolve()


@pytest.fixture(scope="session")
def fixture_clip():
    from resclip_deploy.export.clip_loader import load_clip
    return load_clip("auto", str(WEIGHTS))
