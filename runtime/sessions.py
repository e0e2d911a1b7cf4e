"""Building a bundle's sessions: its graphs on the chosen provider ('auto' takes TensorRT graph
by graph and CUDA where TensorRT refuses one), the stage graphs a plan runs (built for the
settings and vocabulary of the run), and the text tower of a --text-encoder bundle."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Optional

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from resclip_deploy import stage_graphs
from resclip_deploy.bundle import (FULL_PRECISION_GRAPHS, TEXT_BANK_FILE, Bundle, Manifest,
                                   graph_layout)
from resclip_deploy.errors import UserError
from resclip_deploy.params import ResCLIPParams
from resclip_deploy.stages import GRAPH
from resclip_deploy.vocab import Vocabulary

from .providers import (TRT, create_session, device_of, full_precision, gpu_options,
                        graph_session)
from .text import TextEncoder

# The output graph's variant with probabilities (the plain one gives labels only).
OUTPUT_PROBS = "output_probs"


def bundle_sessions(bundle: Bundle, device: str, threads: Optional[int],
                    cache_dir: Optional[str], profile_dir: Optional[str],
                    ) -> tuple[dict[str, ort.InferenceSession], str]:
    """The bundle's graphs -> (graph -> session, the device they bound: 'auto' resolved).
    ``profile_dir``: ONNX Runtime profiles of the sessions go there."""
    manifest = bundle.manifest
    sessions: dict[str, ort.InferenceSession] = {}
    # 'auto' takes TensorRT graph by graph: one it refuses runs on CUDA (and says so)
    fallback = device == "auto"
    # Smallest graph first: 'auto' probes GPU providers on it (a failed probe still parses
    # the graph), then every other graph goes to the provider that bound (TensorRT again
    # after a refusal: it may take the others).
    graphs = sorted(manifest.graphs, key=lambda g: manifest.files[manifest.graphs[g].file]
                    .bytes)
    layout = graph_layout(manifest.params, manifest.text_input)
    for name in graphs:
        entry = manifest.graphs[name]
        prefix = os.path.join(profile_dir, name) if profile_dir else None
        own = full_precision(device) if name in FULL_PRECISION_GRAPHS else device
        sessions[name] = graph_session(bundle.graph_file(name), own, threads, manifest,
                                       layout[name].inputs,
                                       manifest.files[entry.file].sha256, cache_dir,
                                       profile_prefix=prefix, fallback=fallback)
        bundle.check_session(name, sessions[name])
        if device == "auto":
            device = device_of(sessions[name])
            if device == "cuda" and TRT in ort.get_available_providers():
                device = "tensorrt"      # TensorRT refused the first graph: try the others
    return sessions, device


def load_text_bank(bundle: Bundle) -> np.ndarray:
    """The bundle's ``text_bank.npy``: (queries, embed_dim) float32, one row per query."""
    manifest = bundle.manifest
    want = (len(manifest.vocabulary.queries), manifest.model.embed_dim)
    try:
        bank = np.load(bundle.file(TEXT_BANK_FILE), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"bundle {bundle.path}: {TEXT_BANK_FILE} is unreadable ({e}); export "
                        "the bundle again") from None
    if bank.dtype != np.float32 or bank.shape != want:
        raise UserError(f"bundle {bundle.path}: {TEXT_BANK_FILE} holds {bank.dtype} "
                        f"{bank.shape}, not float32 {want} (queries x embedding); export the "
                        "bundle again")
    return bank


def text_encoder(bundle: Bundle, device: str, threads: Optional[int],
                 cache_dir: Optional[str], fallback: bool = False) -> TextEncoder:
    """The bundle's text tower and tokenizer (a --text-encoder bundle)."""
    manifest = bundle.manifest
    spec = manifest.text_encoder
    # The text tower is an fp32 graph in every bundle: no fp16 engine for it.
    gpu = gpu_options(manifest, (), manifest.files[spec.graph].sha256, cache_dir)
    session = create_session(bundle.file(spec.graph), full_precision(device), threads,
                             dataclasses.replace(gpu, fp16=False), fallback=fallback)
    bundle.check_session("text_encoder", session)
    return TextEncoder(Tokenizer.from_file(bundle.file(spec.tokenizer)), session, spec)


def stage_sessions(manifest: Manifest, params: ResCLIPParams, vocab: Vocabulary,
                    plan: dict[str, str], device: str, threads: Optional[int],
                    cache_dir: Optional[str], profile_dir: Optional[str],
                    fallback: bool = False) -> dict[str, Any]:
    """The stage graphs ``plan`` runs, for these settings and this vocabulary."""
    sessions = {stage: stage_session(stage, manifest, params, vocab, device, threads,
                                      cache_dir, profile_dir, fallback=fallback)
                for stage, impl in plan.items() if impl == GRAPH}
    if plan["output"] == GRAPH:      # labels only (above), and with probabilities
        sessions[OUTPUT_PROBS] = stage_session("output", manifest, params, vocab, device,
                                                threads, cache_dir, profile_dir, probs=True,
                                                fallback=fallback)
    return sessions


def stage_session(stage: str, manifest: Manifest, params: ResCLIPParams, vocab: Vocabulary,
                   device: str, threads: Optional[int], cache_dir: Optional[str],
                   profile_dir: Optional[str], probs: bool = False,
                   fallback: bool = False) -> ort.InferenceSession:
    """A session of one stage graph, built for the settings and vocabulary of this run."""
    model = stage_graphs.stage_model(stage, params, manifest.model.patch, vocab.query_to_class,
                                     manifest.preprocess.norm, fp16=manifest.precision == "fp16",
                                     probs=probs).SerializeToString()
    # The stage graphs choose their own precision (fp16 PAMR for fp16 bundles, fp32
    # thresholds and argmaxes): no fp16 engine over them, but for the pre-pass of an fp16
    # bundle, whose fp16-typed loop TensorRT would otherwise run in fp32 (twice the traffic).
    fp16 = manifest.precision == "fp16" and stage == "prepass"
    # Under TensorRT only the pre-pass is worth an engine (it fuses PAMR's loop); the small
    # stage graphs run on the CUDA provider, which takes any shape: no profile limits the
    # output's size or batch there.
    if device == "tensorrt" and stage != "prepass":
        device = "cuda"
    prefix = os.path.join(profile_dir, stage + ("_probs" if probs else "")) \
        if profile_dir else None
    # The pre-pass graph is ~470 ops over (K, Q, h, w) masks: without the CPU arena each one
    # faults in fresh pages (6 ADE20K windows on a CPU provider: 30 s -> 16 s).
    return graph_session(model, full_precision(device), threads, manifest,
                         stage_graphs.input_names(model), hashlib.sha256(model).hexdigest(),
                         cache_dir, len(vocab.queries), fp16, prefix, arena=stage == "prepass",
                         fallback=fallback)


