"""The bundle contract: which graphs exist, their tensors, and the manifest (typed, validated).

A bundle is a directory: ``manifest.json`` + ONNX graphs + ``text_bank.npy``, the text bank the
graphs were built with (their input with --text-encoder, a constant inside them otherwise).
Export writes the manifest through :func:`write_manifest`; the runtime, eval, bench and video
read it only through :func:`read_bundle`, which validates every field before anything else is
read: a missing or malformed field, a file name that leaves the bundle, a changed file or a
graph with other inputs and outputs than the layout declares is one :class:`UserError` naming it.
torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import ntpath
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from .errors import UserError
from .geometry import PixelNorm
from .params import ResCLIPParams
from .vocab import Vocabulary

SCHEMA_VERSION = 2
FORMAT = "resclip-deploy bundle"
MANIFEST = "manifest.json"
TEXT_BANK_FILE = "text_bank.npy"
PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "int8-weights")
TEXT_BANKS = ("constant", "input")
# The ONNX opset of every graph a bundle holds or the runtime builds (bundle, stage and fused
# graphs, the text tower).
OPSET = 18
# The one resize rule of the method: keep the aspect ratio, bilinear on the uint8 image.
RESIZE_RULES = ("keep-ratio-bilinear",)

FLOAT, INT64 = "tensor(float)", "tensor(int64)"
# Element type and rank of every tensor a graph takes or gives, by name (ONNX Runtime's types).
# pixels (B, 3, h, w); tokens (B, T, D); rcs (B, heads, T, T); window (T, T) naclip Ω;
# prepass_logits and logits (B, Q, N) patch cosine logits; sfr_bias (B, T, T);
# text (Q, E) unit query features; text_tokens (P, L) -> text_features (P, E).
TENSORS: dict[str, tuple[str, int]] = {
    "pixels": (FLOAT, 4), "tokens": (FLOAT, 3), "rcs": (FLOAT, 4), "window": (FLOAT, 2),
    "prepass_logits": (FLOAT, 3), "logits": (FLOAT, 3), "sfr_bias": (FLOAT, 3),
    "text": (FLOAT, 2), "text_tokens": (INT64, 2), "text_features": (FLOAT, 2)}
TEXT_ENCODER_IO = (("text_tokens",), ("text_features",))


@dataclass(frozen=True)
class GraphIO:
    """Input and output names of one graph, in order."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def graph_layout(params: ResCLIPParams, text_input: bool) -> dict[str, GraphIO]:
    """The graphs of a bundle and their I/O names (tensors: :data:`TENSORS`).

    Without SFR one graph ``segmenter`` maps pixels to logits. With SFR, ``encoder`` runs the
    trunk and the pre-pass last block, the CPU runs PAMR and builds the SFR matrix, and ``head``
    runs the last block with it.
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


# --- the manifest's parts -------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output as ONNX Runtime reports it; shape dims are ints or names."""

    name: str
    dtype: str
    shape: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphEntry:
    """One ONNX file of the bundle and its recorded inputs and outputs."""

    file: str
    opset: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "opset": self.opset,
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


@dataclass(frozen=True)
class ModelFacts:
    """The exported ViT: patch size, checkpoint grid side, width, blocks, heads, embedding size
    and the trunk blocks averaged for RCS."""

    patch: int
    grid: int
    width: int
    depth: int
    heads: int
    embed_dim: int
    rcs_blocks: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rcs_blocks": list(self.rcs_blocks)}


@dataclass(frozen=True)
class Preprocess:
    """How an RGB image becomes the network input: the resize rule and its sizes, then
    (x − mean) / std per channel in 0..255 units."""

    resize: str
    short_side: int
    long_side_max: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color: str = "RGB"

    @property
    def norm(self) -> PixelNorm:
        return PixelNorm(self.mean, self.std)

    def to_dict(self) -> dict[str, Any]:
        return {"color": self.color, "resize": self.resize, "short_side": self.short_side,
                "long_side_max": self.long_side_max, "mean": list(self.mean),
                "std": list(self.std)}


@dataclass(frozen=True)
class TextEncoderSpec:
    """--text-encoder bundles: the text tower graph, the tokenizer file and how prompts are
    tokenised (context length, start/end tokens, the prompt templates)."""

    graph: str
    tokenizer: str
    context_length: int
    sot: int
    eot: int
    templates: tuple[str, ...]
    truncate_context: bool
    tokens_checked: int
    entry: GraphEntry

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "tokenizer": self.tokenizer,
                "context_length": self.context_length, "sot": self.sot, "eot": self.eot,
                "templates": list(self.templates), "truncate_context": self.truncate_context,
                "tokens_checked": self.tokens_checked, "opset": self.entry.opset,
                "inputs": [t.to_dict() for t in self.entry.inputs],
                "outputs": [t.to_dict() for t in self.entry.outputs]}


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


# Graphs that keep full precision in OpenVINO's bf16 mode and in int8-weights bundles: the head
# is ~3 % of the time and carries most of the labels a lower precision changes (random
# ViT-B/16, fixture photos, equal to fp32: bf16 VOC20 98.93 -> 99.76 %, ADE20K 99.24 ->
# 99.66 %; int8 weights ADE20K 97.2-97.4 -> 99.71 %).
FULL_PRECISION_GRAPHS = ("head",)


@dataclass(frozen=True)
class Manifest:
    """Everything a bundle declares. ``source``, ``versions``, ``timings_s`` and
    ``verification`` are records for people (what it was made from, with what, how well it
    verified; a bundle without its verification record is refused); the runtime reads the
    other fields."""

    source: dict[str, Any]
    model: ModelFacts
    params: ResCLIPParams
    vocabulary: Vocabulary
    preprocess: Preprocess
    precision: str
    text_bank: str
    text_encoder: Optional[TextEncoderSpec]
    graphs: dict[str, GraphEntry]
    files: dict[str, FileEntry]
    package_version: str
    created: str
    versions: dict[str, str]
    timings_s: dict[str, float]
    verification: Optional[dict[str, Any]] = None

    @property
    def text_input(self) -> bool:
        """The text bank is a graph input (and may be replaced at run time)."""
        return self.text_bank == "input"

    @property
    def size_bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        vocab = self.vocabulary
        return {
            "schema": SCHEMA_VERSION, "format": FORMAT, "package_version": self.package_version,
            "created": self.created, "source": self.source, "model": self.model.to_dict(),
            "params": self.params.to_dict(),
            "vocabulary": {**vocab.to_dict(), "queries": list(vocab.queries),
                           "query_to_class": list(vocab.query_to_class),
                           "class_names": list(vocab.class_names)},
            "preprocess": self.preprocess.to_dict(), "precision": self.precision,
            "text_bank": self.text_bank,
            "text_encoder": None if self.text_encoder is None else self.text_encoder.to_dict(),
            "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
            "versions": self.versions, "timings_s": self.timings_s,
            "files": {name: dataclasses.asdict(f) for name, f in self.files.items()},
            **({} if self.verification is None else {"verification": self.verification}),
        }


def public_source(source: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``source`` as a service shows it to any client: model names, file names
    and checksums, not the paths of the machine that made the bundle ('/srv/w/b16.pt' ->
    'b16.pt', 'local-dir:/srv/m' -> 'local-dir:m'; 'hf-hub:org/repo' stays)."""
    def public(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        scheme = re.match(r"[a-z][a-z0-9-]+:", value)     # 'local-dir:', not a drive 'C:'
        head, rest = (value[:scheme.end()], value[scheme.end():]) if scheme else ("", value)
        if posixpath.isabs(rest) or ntpath.isabs(rest) or rest.startswith("~"):
            return head + re.split(r"[/\\]", rest.rstrip("/\\"))[-1]   # made on any system
        return value
    return {key: public(value) for key, value in source.items()}


def write_manifest(folder: str, manifest: Manifest) -> None:
    """manifest.json in ``folder`` (export writes into its temporary directory)."""
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=1)
        f.write("\n")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(folder: str) -> dict[str, FileEntry]:
    """Every file of ``folder`` but the manifest: its sha256 and size."""
    return {name: FileEntry(file_sha256(os.path.join(folder, name)),
                            os.path.getsize(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder)) if name != MANIFEST}


# --- reading and validating -----------------------------------------------------------------


class _Fields:
    """Typed reads of one JSON object of the manifest; every error names the dotted field."""

    def __init__(self, value: Any, where: str, field: str):
        self.where, self.field = where, field
        if not isinstance(value, dict):
            raise self.error(field or "(top level)", f"must be an object, not {_kind(value)}")
        self.d = value

    def error(self, field: str, problem: str) -> UserError:
        return UserError(f"bundle {self.where}: {MANIFEST} field '{field}' {problem}; export "
                         "the bundle again")

    def name(self, key: str) -> str:
        return f"{self.field}.{key}" if self.field else key

    def get(self, key: str, kind: type | tuple[type, ...], what: str,
            optional: bool = False) -> Any:
        if key not in self.d or (optional and self.d[key] is None):
            if optional:
                return None
            raise self.error(self.name(key), "is missing")
        value = self.d[key]
        # JSON true/false are Python bools, which are ints too: never accept one for the other.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
            raise self.error(self.name(key), f"must be {what}, not {_kind(value)}")
        return value

    def str(self, key: str, choices: Optional[Sequence[str]] = None,
            optional: bool = False) -> Any:
        value = self.get(key, str, "a string", optional)
        if choices is not None and value is not None and value not in choices:
            raise self.error(self.name(key), f"is {value!r}, not one of {', '.join(choices)}")
        return value

    def int(self, key: str, minimum: int = 0) -> int:
        value = self.get(key, int, "an integer")
        if value < minimum:
            raise self.error(self.name(key), f"is {value}, below {minimum}")
        return value

    def bool(self, key: str) -> bool:
        return self.get(key, bool, "true or false")

    def obj(self, key: str, optional: bool = False) -> Optional["_Fields"]:
        value = self.get(key, dict, "an object", optional)
        return None if value is None else _Fields(value, self.where, self.name(key))

    def list(self, key: str, check: Callable[[Any, str], Any], length: Optional[int] = None,
             ) -> tuple[Any, ...]:
        value = self.get(key, list, "a list")
        if length is not None and len(value) != length:
            raise self.error(self.name(key), f"has {len(value)} entries, not {length}")
        return tuple(check(v, f"{self.name(key)}[{i}]") for i, v in enumerate(value))

    def file_name(self, key: str) -> str:
        value = self.str(key)
        if not is_plain_name(value):
            raise self.error(self.name(key), f"is {value!r}, not a plain file name inside the "
                                             "bundle (no path separators, '..' or absolute paths)")
        return value


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            type(None): "null"}.get(type(value), type(value).__name__)


def is_plain_name(name: str) -> bool:
    """A file name that can only mean a file directly inside the bundle directory."""
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name)
            and (os.altsep is None or os.altsep not in name))


def _read_tensor(value: Any, where: str, field: str) -> TensorInfo:
    f = _Fields(value, where, field)
    shape = f.list("shape", lambda d, name: _dim(f, d, name))
    return TensorInfo(f.str("name"), f.str("dtype"), shape)


def _dim(f: _Fields, dim: Any, name: str) -> Any:
    if isinstance(dim, bool) or not isinstance(dim, (int, str, type(None))):
        raise f.error(name, f"must be an integer or a dimension name, not {_kind(dim)}")
    return dim


def _read_graph(f: _Fields, file_key: str) -> GraphEntry:
    def tensor(v: Any, name: str) -> TensorInfo:
        return _read_tensor(v, f.where, name)
    return GraphEntry(f.file_name(file_key), f.int("opset", 1), f.list("inputs", tensor),
                      f.list("outputs", tensor))


def io_mismatch(inputs: Sequence[Any], outputs: Sequence[Any], io: GraphIO,
                ) -> Optional[tuple[str, str, str]]:
    """Tensors (manifest :class:`TensorInfo` entries or ONNX Runtime's args) against the
    layout's names, element types and ranks -> (part, got, want) signatures of the first part
    that differs; None when both match."""
    for part, tensors, names in (("inputs", inputs, io.inputs), ("outputs", outputs, io.outputs)):
        got = [(t.name, t.dtype if isinstance(t, TensorInfo) else t.type, len(t.shape))
               for t in tensors]
        want = [(n, *TENSORS[n]) for n in names]
        if got != want:
            return part, _signature(got), _signature(want)
    return None


def _check_declared(f: _Fields, field: str, entry: GraphEntry, io: GraphIO) -> None:
    """A graph's recorded inputs and outputs against the layout the settings imply."""
    bad = io_mismatch(entry.inputs, entry.outputs, io)
    if bad:
        raise f.error(f"{field}.{bad[0]}", f"lists {bad[1]}; this bundle's settings give {bad[2]}")


def _signature(tensors: Sequence[tuple[str, str, int]]) -> str:
    return "[" + ", ".join(f"{n} {d.removeprefix('tensor(').rstrip(')')} rank {r}"
                           for n, d, r in tensors) + "]"


def _read_params(f: _Fields) -> ResCLIPParams:
    d = f.get("params", dict, "an object")
    fields = {x.name for x in dataclasses.fields(ResCLIPParams)}
    missing = sorted(fields - set(d))
    if missing:
        raise f.error(f"params.{missing[0]}", "is missing")
    try:
        return ResCLIPParams.from_dict(d)
    except (UserError, TypeError) as e:
        raise f.error("params", f"is not valid ({e})") from None


def _read_vocabulary(f: _Fields) -> Vocabulary:
    v = f.obj("vocabulary")

    def names(value: Any, name: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise v.error(name, "must be a list of strings (a class and its synonyms)")
        return tuple(value)
    classes = v.list("classes", names)
    try:
        vocab = Vocabulary(classes, v.str("source"))
    except UserError as e:
        raise v.error("vocabulary.classes", f"is not valid ({e})") from None
    for key in ("queries", "query_to_class", "class_names"):
        if list(v.get(key, list, "a list")) != list(getattr(vocab, key)):
            raise v.error(f"vocabulary.{key}", "does not match vocabulary.classes")
    return vocab


def _read_model(f: _Fields) -> ModelFacts:
    m = f.obj("model")

    def block(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise m.error(name, "must be a block index")
        return value
    return ModelFacts(m.int("patch", 1), m.int("grid", 1), m.int("width", 1), m.int("depth", 2),
                      m.int("heads", 1), m.int("embed_dim", 1), m.list("rcs_blocks", block))


def _read_preprocess(f: _Fields, params: ResCLIPParams) -> Preprocess:
    p = f.obj("preprocess")

    def number(value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise p.error(name, "must be a finite number")
        return float(value)

    def positive(value: Any, name: str) -> float:
        if number(value, name) <= 0:
            raise p.error(name, "must be positive")
        return float(value)
    pre = Preprocess(p.str("resize", RESIZE_RULES), p.int("short_side", 1),
                     p.int("long_side_max", 1), p.list("mean", number, 3),
                     p.list("std", positive, 3), p.str("color", ("RGB",)))
    for key in ("short_side", "long_side_max"):
        if getattr(pre, key) != getattr(params, key):
            raise p.error(f"preprocess.{key}", f"is {getattr(pre, key)}, but params.{key} is "
                                               f"{getattr(params, key)}")
    return pre


def _read_text_encoder(f: _Fields, text_input: bool) -> Optional[TextEncoderSpec]:
    """Null unless the text bank is a graph input: export makes one only with the other."""
    if "text_encoder" not in f.d:
        raise f.error("text_encoder", "is missing")
    t = f.obj("text_encoder", optional=True)
    if (t is None) == text_input:
        raise f.error("text_encoder", f"is {'null' if t is None else 'given'}, but text_bank "
                                      f"is {'input' if text_input else 'constant'}")
    if t is None:
        return None

    def template(value: Any, name: str) -> str:
        if not isinstance(value, str) or "{}" not in value:
            raise t.error(name, "must be a prompt template with '{}'")
        return value
    entry = _read_graph(t, "graph")
    _check_declared(t, "text_encoder", entry, GraphIO(*TEXT_ENCODER_IO))
    return TextEncoderSpec(entry.file, t.file_name("tokenizer"), t.int("context_length", 2),
                           t.int("sot"), t.int("eot"), t.list("templates", template),
                           t.bool("truncate_context"), t.int("tokens_checked"), entry)


def _read_files(f: _Fields) -> dict[str, FileEntry]:
    files = f.obj("files")
    out = {}
    for name in files.d:
        if not is_plain_name(name):
            raise f.error(f"files.{name}", "is not a plain file name inside the bundle (no path "
                                           "separators, '..' or absolute paths)")
        e = files.obj(name)
        digest = e.str("sha256")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise e.error(e.name("sha256"), "must be 64 lowercase hex digits")
        out[name] = FileEntry(digest, e.int("bytes"))
    return out


def parse_manifest(data: Any, where: str, verified: bool = True) -> Manifest:
    """The manifest's JSON -> :class:`Manifest`; every field checked (``where`` names the
    bundle in errors; ``verified``: see :func:`read_bundle`)."""
    f = _Fields(data, where, "")
    params = _read_params(f)
    text_bank = f.str("text_bank", TEXT_BANKS)
    graphs_obj = f.obj("graphs")
    layout = graph_layout(params, text_bank == "input")
    if set(graphs_obj.d) != set(layout):
        raise f.error("graphs", f"lists {sorted(graphs_obj.d)}; this bundle's settings give "
                                f"{sorted(layout)}")
    graphs = {}
    for name, io in layout.items():
        graphs[name] = _read_graph(graphs_obj.obj(name), "file")
        _check_declared(f, f"graphs.{name}", graphs[name], io)
    text_encoder = _read_text_encoder(f, text_bank == "input")
    files = _read_files(f)
    named = [g.file for g in graphs.values()] + [TEXT_BANK_FILE] + (
        [] if text_encoder is None else [text_encoder.graph, text_encoder.tokenizer])
    unlisted = [n for n in named if n not in files]
    if unlisted:
        raise f.error("files", f"has no entry for {unlisted[0]} (every file the bundle uses is "
                               "checksummed)")
    # Every finished export records it; only the export reads its bundle before it is written.
    verification = f.obj("verification", optional=not verified)

    def numbers(key: str) -> dict[str, Any]:
        return f.get(key, dict, "an object")
    return Manifest(
        source=f.get("source", dict, "an object"), model=_read_model(f), params=params,
        vocabulary=_read_vocabulary(f), preprocess=_read_preprocess(f, params),
        precision=f.str("precision", PRECISIONS), text_bank=text_bank,
        text_encoder=text_encoder, graphs=graphs, files=files,
        package_version=f.str("package_version"), created=f.str("created"),
        versions=numbers("versions"), timings_s=numbers("timings_s"),
        verification=None if verification is None else verification.d)


@dataclass(frozen=True)
class Bundle:
    """A validated bundle on disk: its directory and its manifest."""

    path: str
    manifest: Manifest

    def file(self, name: str) -> str:
        """The path of a file the manifest lists (names were checked to be plain at load)."""
        assert name in self.manifest.files, name
        return os.path.join(self.path, name)

    def graph_file(self, graph: str) -> str:
        return self.file(self.manifest.graphs[graph].file)

    def check_session(self, graph: str, session: Any) -> None:
        """An ONNX Runtime session's inputs and outputs (names in order, element types, ranks)
        against the layout the manifest declares; ``graph`` is a layout name or
        'text_encoder'."""
        if graph == "text_encoder":
            io, file = GraphIO(*TEXT_ENCODER_IO), self.manifest.text_encoder.graph
        else:
            io = graph_layout(self.manifest.params, self.manifest.text_input)[graph]
            file = self.manifest.graphs[graph].file
        bad = io_mismatch(session.get_inputs(), session.get_outputs(), io)
        if bad:
            raise UserError(f"bundle {self.path}: {file} has {bad[0]} {bad[1]}, but the manifest "
                            f"declares {bad[2]}; export the bundle again")


def read_bundle(path: str, verified: bool = True) -> Bundle:
    """Open a bundle directory: schema, every manifest field, file names, then every listed
    file's sha256. Nothing the manifest names is opened before all of it is validated.

    ``verified=False``: the export's own reading of its bundle, before the verification record
    that every finished bundle carries is written."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise UserError(f"bundle {path} is not a directory; make one with resclip-export")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"bundle {path} has no {MANIFEST}; it is not a resclip-export bundle "
                        "(or the export did not finish): export it again") from None
    except (OSError, ValueError) as e:
        raise UserError(f"bundle {path}: {MANIFEST} is unreadable ({e}); export it again") \
            from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise UserError(f"bundle {path}: {MANIFEST} has no schema version; export it again")
    if schema > SCHEMA_VERSION:
        raise UserError(f"bundle {path} uses manifest schema {schema}, newer than this "
                        f"resclip-deploy reads ({SCHEMA_VERSION}); upgrade resclip-deploy or "
                        "export the bundle with this version")
    if schema < SCHEMA_VERSION:
        raise UserError(f"bundle {path} uses the old manifest schema {schema}; export it again "
                        "with this resclip-deploy")
    if data.get("format") != FORMAT:
        raise UserError(f"bundle {path}: {MANIFEST} is not a {FORMAT} manifest (format "
                        f"{data.get('format')!r}); export it again")
    bundle = Bundle(path, parse_manifest(data, path, verified))
    _check_files(bundle)
    return bundle


def _check_files(bundle: Bundle) -> None:
    root = os.path.realpath(bundle.path)
    for name in bundle.manifest.files:
        full = os.path.join(bundle.path, name)
        if os.path.islink(full) and \
                os.path.dirname(os.path.realpath(full)) != root:
            raise UserError(f"bundle {bundle.path}: {name} is a symbolic link to a file outside "
                            "the bundle, which is refused; copy the file into the bundle or "
                            "export it again")
        if not os.path.isfile(full):
            raise UserError(f"bundle {bundle.path}: {name} is missing; export the bundle again")
    for name, entry in bundle.manifest.files.items():
        if file_sha256(os.path.join(bundle.path, name)) != entry.sha256:
            raise UserError(f"bundle {bundle.path}: {name} does not match its sha256 in the "
                            "manifest (changed after export); export the bundle again")
