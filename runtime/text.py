"""A new text bank without torch: the bundle's text-encoder graph and tokenizer file.

Needs a bundle exported with ``resclip-export --text-encoder``.
"""

from __future__ import annotations

import html
from typing import Callable, Optional, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from resclip_deploy.bundle import TextEncoderSpec
from resclip_deploy.textbank import bank_from_tokens, check_fits, prompts_for


def clean(text: str) -> str:
    """open_clip's basic clean minus ftfy: HTML entities unescaped (twice), ends stripped."""
    return html.unescape(html.unescape(text)).strip()


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], ctx: int, sot: int,
                   eot: int) -> np.ndarray:
    """Prompts -> (P, ctx) int64: start token ``sot``, BPE ids, end token ``eot``, zero
    padding."""
    out = np.zeros((len(prompts), ctx), dtype=np.int64)
    for row, enc in enumerate(tokenizer.encode_batch([clean(p) for p in prompts],
                                                     add_special_tokens=False)):
        ids = [sot, *enc.ids, eot]
        if len(ids) > ctx:
            ids = ids[:ctx - 1] + [eot]
        out[row, :len(ids)] = ids
    check_fits(out, prompts)
    return out


class TextEncoder:
    """Tokenizer + text-encoder session -> unit query features for any vocabulary."""

    def __init__(self, tokenizer: Tokenizer, session: ort.InferenceSession,
                 spec: TextEncoderSpec):
        self.tokenizer, self.session, self.spec = tokenizer, session, spec

    def bank(self, queries: Sequence[str],
             progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
        """(Q, E) float32 unit query features (80 templates, as the export's bank)."""
        spec = self.spec
        tokens = encode_prompts(self.tokenizer, prompts_for(queries, spec.templates),
                                spec.context_length, spec.sot, spec.eot)

        def encode(t: np.ndarray) -> np.ndarray:
            return self.session.run(["text_features"], {"text_tokens": t})[0]
        return bank_from_tokens(tokens, encode, len(queries), spec.truncate_context,
                                progress=progress)
