"""The bundle contract: which graphs exist, their I/O names, and the manifest (read, validate).

Export writes bundles through this module and the runtime reads them only through it, so names
and shapes are declared once here. A bundle is a directory: ``manifest.json`` + ONNX graphs
+ ``text_bank.npy``, the text bank the graphs were built with (their input with --text-encoder,
a constant inside them otherwise). torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .params import ResCLIPParams
from .vocab import Vocabulary

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TEXT_BANK_FILE = "text_bank.npy"
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class GraphIO:
    """Input and output names of one graph, in order."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def graph_layout(params: ResCLIPParams, text_input: bool) -> dict[str, GraphIO]:
    """The graphs of a bundle and their I/O names.

    Without SFR one graph ``segmenter`` maps pixels to logits. With SFR, ``encoder`` runs the
    trunk and the pre-pass last block, the CPU runs PAMR and builds the SFR matrix, and ``head``
    runs the last block with it.

    pixels (B, 3, h, w) f32; tokens (B, T, D); rcs (B, heads, T, T); window (T, T) naclip Ω;
    prepass_logits and logits (B, Q, N) patch cosine logits; sfr_bias (B, T, T);
    text (Q, E) unit query features.
    """
    text = ("text",) if text_input else ()
    rcs = ("rcs",) if params.rcs else ()
    window = ("window",) if params.method == "naclip" else ()
    if not params.sfr:
        return {"segmenter": GraphIO(("pixels", *text), ("logits",))}
    return {
        "encoder": GraphIO(("pixels", *text),
                           ("tokens", *rcs, *window, "prepass_logits")),
        "head": GraphIO(("tokens", *rcs, *window, "sfr_bias", *text), ("logits",)),
    }


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Bundle:
    """A validated bundle on disk."""

    path: str
    manifest: dict[str, Any]

    @property
    def params(self) -> ResCLIPParams:
        return ResCLIPParams.from_dict(self.manifest["params"])

    @property
    def vocabulary(self) -> Vocabulary:
        return Vocabulary.from_dict(self.manifest["vocabulary"])

    @property
    def patch(self) -> int:
        return int(self.manifest["model"]["patch"])

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def graph_file(self, graph: str) -> str:
        return self.file(self.manifest["graphs"][graph]["file"])


def read_bundle(path: str) -> Bundle:
    """Open a bundle directory: schema check, then every listed file's sha256."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise UserError(f"bundle {path} is not a directory; make one with resclip-export")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise UserError(f"bundle {path} has no {MANIFEST}; it is not a resclip-export bundle "
                        "(or the export did not finish): export it again") from None
    except (OSError, ValueError) as e:
        raise UserError(f"bundle {path}: {MANIFEST} is unreadable ({e}); export it again") \
            from None
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    if not isinstance(schema, int):
        raise UserError(f"bundle {path}: {MANIFEST} has no schema version; export it again")
    if schema > SCHEMA_VERSION:
        raise UserError(f"bundle {path} uses manifest schema {schema}, newer than this "
                        f"resclip-deploy reads ({SCHEMA_VERSION}); upgrade resclip-deploy or "
                        "export the bundle with this version")
    if schema < SCHEMA_VERSION:
        raise UserError(f"bundle {path} uses the old manifest schema {schema}; export it again")
    bundle = Bundle(path, manifest)
    for name, entry in manifest["files"].items():
        full = bundle.file(name)
        if not os.path.isfile(full):
            raise UserError(f"bundle {path}: {name} is missing; export the bundle again")
        if file_sha256(full) != entry["sha256"]:
            raise UserError(f"bundle {path}: {name} does not match its sha256 in the "
                            "manifest (changed after export); export the bundle again")
    return bundle
