"""The method's settings: one frozen dataclass, validated on construction, and the paper's presets.

Every number the pipeline uses comes from a :class:`ResCLIPParams`; inner functions take the
fields they need as explicit arguments. The presets carry the values of the authors' configs
(docs/method.md §1); :data:`CUSTOM` holds the defaults for a user's own vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from .errors import UserError

METHODS = ("clip", "sclip", "clearclip", "naclip")
# clip/sclip keep the last block's residual and MLP; naclip/clearclip drop both
# (docs/method.md §4 step 5).
RESIDUAL_METHODS = ("clip", "sclip")
CONNECTIVITIES = ("reference", "components")
MODES = ("slide", "whole")

# SFR pre-pass refinement (docs/method.md §5); fixed by the method, not a user setting.
# The settings applied on the CPU between or after the graphs, which a run may change; every
# other one is fixed in the exported graphs. The CLI's flags, the refusals and the summary's
# echo are made from this list.
RUNTIME_SETTINGS = ("connectivity", "prob_thd", "temp_thd")


def flag(setting: str) -> str:
    """'prob_thd' -> '--prob-thd'."""
    return "--" + setting.replace("_", "-")


PAMR_ITERATIONS = 10
PAMR_DILATIONS = (8, 16)

# RCS window of the paper for a 12-block ViT: blocks 6..9, i.e. 0-based [5, 9).
_RCS_WINDOW_12 = (5, 9)


@dataclass(frozen=True)
class ResCLIPParams:
    """All settings of one ResCLIP run (docs/method.md §1). Frozen; validated on construction."""

    # Base attention of the last block: clip | sclip | clearclip | naclip (docs/method.md §4).
    method: str = "naclip"
    # Residual Cross-correlation Self-attention: mix the trunk's attention maps into the last block.
    rcs: bool = True
    # τ of RCS: scale of the blended attention probabilities.
    rcs_tau: float = 2.0
    # λ of RCS: weight of the RCS map against the last block's own attention, in [0, 1].
    rcs_lambda: float = 0.5
    # 0-based trunk blocks averaged for RCS; None = the paper's blocks 5..8 of 12, scaled to the
    # model depth by rcs_blocks().
    rcs_layers: Optional[tuple[int, ...]] = None
    # Semantic Feedback Refinement: a pre-pass's labels bias the last block's attention.
    sfr: bool = True
    # τ of SFR: scale of the blended attention logits.
    sfr_tau: float = 2.0
    # λ of SFR: weight of the SFR matrix against the base attention logits, in [0, 1].
    sfr_lambda: float = 0.7
    # SFR pre-pass: pixels whose best query probability is below this get no label.
    temp_thd: float = 0.25
    # SFR same-entity test: 'components' (8-connected, as the paper describes) or 'reference'
    # (the authors' line walk, for their exact numbers).
    connectivity: str = "components"
    # σ (in patches) of the naclip neighbourhood window and of the SFR matrix's row blur.
    gaussian_std: float = 5.0
    # Softmax temperature of the pre-pass and of the output probabilities.
    logit_scale: float = 40.0
    # Output: label 0 where the best class probability is below this (0 = off).
    prob_thd: float = 0.0
    # 'slide' (crop x crop windows every stride pixels) or 'whole' (one forward of the image).
    mode: str = "slide"
    # Slide mode: window side in pixels.
    crop: int = 224
    # Slide mode: step between windows in pixels (at most crop).
    stride: int = 112
    # Keep-ratio resize: the short side becomes this many pixels ...
    short_side: int = 336
    # ... unless the long side would then exceed this (docs/method.md §2.1).
    long_side_max: int = 2048

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("connectivity", self.connectivity, CONNECTIVITIES)
        _check_choice("mode", self.mode, MODES)
        for name in ("rcs", "sfr"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name}={getattr(self, name)!r}: must be true or false")
        for name in ("rcs_tau", "sfr_tau", "gaussian_std", "logit_scale"):
            _check_range(name, getattr(self, name), 0.0, 1e6, low_open=True)
        for name in ("rcs_lambda", "sfr_lambda", "temp_thd", "prob_thd"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("crop", "stride", "short_side", "long_side_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{name}={value!r}: must be a positive integer")
        if self.stride > self.crop:
            raise UserError(
                f"stride={self.stride} is larger than crop={self.crop}: pixels between windows "
                "would get no prediction; use a stride <= crop")
        if self.rcs_layers is not None:
            if not isinstance(self.rcs_layers, (list, tuple)):
                raise UserError(f"rcs_layers={self.rcs_layers!r}: must be a list of 0-based "
                                "block indices")
            layers = tuple(self.rcs_layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                 for i in layers) or len(set(layers)) != len(layers):
                raise UserError(f"rcs_layers={self.rcs_layers!r}: must be distinct 0-based block "
                                "indices, at least one")
            object.__setattr__(self, "rcs_layers", layers)

    @property
    def residual_last_block(self) -> bool:
        return self.method in RESIDUAL_METHODS

    def replace(self, **changes: Any) -> "ResCLIPParams":
        """A copy with ``changes`` applied (validated again).

        None values are ignored, so unset command-line options leave the preset's value; use
        ``dataclasses.replace`` to set a field to None.
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise UserError(f"unknown setting(s) {sorted(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rcs_layers"] = None if self.rcs_layers is None else list(self.rcs_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResCLIPParams":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"unknown setting(s) {sorted(unknown)} in parameter dictionary")
        if isinstance(d.get("rcs_layers"), list):
            d["rcs_layers"] = tuple(d["rcs_layers"])
        return cls(**d)


def rcs_blocks(rcs_layers: Optional[tuple[int, ...]], depth: int) -> tuple[int, ...]:
    """0-based trunk blocks averaged for RCS in a ViT of ``depth`` blocks.

    Explicit ``rcs_layers`` are checked against the trunk (blocks 0..depth-2; the last block is the
    one ResCLIP replaces). Otherwise the paper's window [5, 9) of 12 blocks is scaled to the depth
    with round-half-up of 5·L/12 and 9·L/12, e.g. L=24 (ViT-L/14) gives blocks 10..17, and
    clipped to the trunk; at least one block is kept.
    """
    if depth < 2:
        raise UserError(f"a ViT with {depth} block(s) has no trunk for RCS; RCS needs >= 2 blocks")
    if rcs_layers is not None:
        bad = [i for i in rcs_layers if i > depth - 2]
        if bad:
            raise UserError(f"rcs_layers {list(bad)} are outside the trunk of this {depth}-block "
                            f"ViT (blocks 0..{depth - 2})")
        return tuple(rcs_layers)
    start = math.floor(_RCS_WINDOW_12[0] * depth / 12 + 0.5)
    stop = min(math.floor(_RCS_WINDOW_12[1] * depth / 12 + 0.5), depth - 1)
    start = min(start, stop - 1)
    return tuple(range(start, stop))


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name}={value!r} is not known; choose one of {', '.join(choices)}")


def _check_range(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise UserError(f"{name}={value!r}: must be a number")
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise UserError(f"{name}={value!r} is outside {bound}")


def _preset(**values: Any) -> ResCLIPParams:
    # The paper's main setting (naclip + RCS + SFR) with one benchmark's values. Connectivity
    # stays at our default, 'components'; parity runs ask for 'reference'.
    return ResCLIPParams(method="naclip", rcs=True, sfr=True, **values)


# name -> (settings, class file shipped in resclip_deploy/classes). Values: docs/method.md §1.
PRESETS: dict[str, tuple[ResCLIPParams, str]] = {
    "voc20": (_preset(temp_thd=0.10, rcs_lambda=0.6, sfr_tau=2.1, sfr_lambda=0.6,
                      mode="whole"), "cls_voc20.txt"),
    "voc21": (_preset(temp_thd=0.50, rcs_lambda=0.3, sfr_tau=2.2, sfr_lambda=0.7, prob_thd=0.1,
                      mode="whole"), "cls_voc21.txt"),
    "context59": (_preset(temp_thd=0.25, rcs_lambda=0.4, sfr_tau=1.8, sfr_lambda=0.7),
                  "cls_context59.txt"),
    "context60": (_preset(temp_thd=0.30, rcs_lambda=0.3, sfr_tau=1.8, sfr_lambda=0.7,
                          prob_thd=0.1), "cls_context60.txt"),
    "coco_object": (_preset(temp_thd=0.11, rcs_lambda=0.4, sfr_tau=1.8, sfr_lambda=0.7,
                            prob_thd=0.1), "cls_coco_object.txt"),
    "coco_stuff164k": (_preset(temp_thd=0.11, rcs_lambda=0.4, sfr_tau=1.8, sfr_lambda=0.7),
                       "cls_coco_stuff.txt"),
    "city_scapes": (_preset(temp_thd=0.10, rcs_lambda=0.2, sfr_tau=2.1, sfr_lambda=0.6,
                            short_side=560), "cls_city_scapes.txt"),
    "ade20k": (_preset(temp_thd=0.25, rcs_lambda=0.3, sfr_tau=2.1, sfr_lambda=0.7),
               "cls_ade20k.txt"),
}

# A user's own vocabulary: the paper's robust λ (RCS 0.5, SFR 0.7), our connected components.
CUSTOM = ResCLIPParams()


def preset_params(name: str) -> ResCLIPParams:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name][0]
