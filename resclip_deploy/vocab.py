"""Vocabularies: classes with synonyms, flattened to text queries (docs/method.md §2.3).

A class file has one class per line, synonyms separated by ', ' (comma + space); only the newline
is stripped, as the reference code does. On the command line a vocabulary may also be a comma list,
``"sky,person|man|woman,tree"``: commas separate classes, '|' separates synonyms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .errors import UserError
from .params import PRESETS

FILE_SYNONYM_SEP = ", "
LIST_CLASS_SEP = ","
LIST_SYNONYM_SEP = "|"


@dataclass(frozen=True)
class Vocabulary:
    """classes[c] = the synonyms of class c (each one text query); order defines class indices."""

    classes: tuple[tuple[str, ...], ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.classes:
            raise UserError(f"vocabulary {self.source or '(given)'} is empty; give at least one "
                            "class")
        for c, names in enumerate(self.classes):
            if not names or any(not n.strip() for n in names):
                raise UserError(f"vocabulary {self.source or '(given)'}: class {c} has an empty "
                                f"name ({names!r}); remove the empty entry")

    @property
    def queries(self) -> tuple[str, ...]:
        return tuple(n for names in self.classes for n in names)

    @property
    def query_to_class(self) -> tuple[int, ...]:
        return tuple(c for c, names in enumerate(self.classes) for _ in names)

    @property
    def class_names(self) -> tuple[str, ...]:
        """One display name per class: its first synonym, trimmed."""
        return tuple(names[0].strip() for names in self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {"classes": [list(n) for n in self.classes], "source": self.source}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Vocabulary":
        return cls(tuple(tuple(n) for n in d["classes"]), d.get("source", ""))


def parse_class_text(text: str, source: str) -> Vocabulary:
    """Class-file text -> Vocabulary. Only '\\n' is stripped (a trailing space survives)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines):
        if not line.strip():
            raise UserError(f"class file {source}: line {i + 1} is empty; every line must name "
                            "a class")
    return Vocabulary(tuple(tuple(line.split(FILE_SYNONYM_SEP)) for line in lines), source)


def parse_class_list(spec: str) -> Vocabulary:
    """'sky,person|man,tree' -> 3 classes; whitespace around names is dropped."""
    classes = []
    for item in spec.split(LIST_CLASS_SEP):
        names = tuple(n.strip() for n in item.split(LIST_SYNONYM_SEP))
        if not any(names):
            raise UserError(f"class list {spec!r} has an empty class between commas; remove it")
        classes.append(names)
    return Vocabulary(tuple(classes), f"list:{spec}")


def load_class_file(path: str) -> Vocabulary:
    try:
        # Universal newlines, as the reference's readlines(): '\r\n' files lose the '\r' too.
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"class file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"class file {path} cannot be read as UTF-8 text: {e}") from None
    return parse_class_text(text, path)


def preset_vocabulary(name: str) -> Vocabulary:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    filename = PRESETS[name][1]
    text = resources.files("resclip_deploy").joinpath("classes", filename).read_text("utf-8")
    return parse_class_text(text, f"preset:{name}")


def resolve_vocabulary(classes: str) -> Vocabulary:
    """A --classes value: an existing file, else a comma list (a path-looking value must exist)."""
    if os.path.isfile(classes):
        return load_class_file(classes)
    looks_like_path = os.sep in classes or classes.endswith(".txt")
    if looks_like_path and LIST_CLASS_SEP not in classes:
        raise UserError(f"class file {classes} does not exist (give a file with one class per "
                        "line, or a comma list like 'sky,person|man,tree')")
    return parse_class_list(classes)
