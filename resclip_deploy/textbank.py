"""Building the text-embedding bank from any text encoder (torch or ONNX): numpy only.

One unit feature per query: the 80 OpenAI ImageNet prompt templates -> tokens -> encoder ->
L2-normalise -> mean over templates -> L2-normalise (docs/method.md §2.4). Text attention is
causal, so the end-of-text feature depends only on the tokens before it: prompts are sorted by
length and each batch runs with the context cut to its longest prompt (same features, several
times less work).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from .errors import UserError

Encoder = Callable[[np.ndarray], np.ndarray]      # (B, L) int64 tokens -> (B, E) features


def prompts_for(queries: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Q queries x T templates ('a photo of a {}.') -> Q·T prompts, query-major."""
    return [t.replace("{}", q) for q in queries for t in templates]


def token_lengths(tokens: np.ndarray) -> np.ndarray:
    """(P, ctx) tokens -> index of the last non-padding token + 1 (padding id 0)."""
    nonzero = tokens[:, ::-1] != 0
    return tokens.shape[1] - nonzero.argmax(axis=1)


def check_fits(tokens: np.ndarray, prompts: Sequence[str]) -> None:
    """A prompt that fills the whole context was (or would be) truncated: refuse it."""
    full = np.flatnonzero(tokens[:, -1] != 0)
    if full.size:
        raise UserError(f"class name too long for the text encoder's {tokens.shape[1]}-token "
                        f"context (prompt {prompts[full[0]]!r}); shorten it")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def bank_from_tokens(tokens: np.ndarray, encode: Encoder, num_queries: int,
                     truncate: bool, batch_size: int = 512,
                     progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """(Q·T, ctx) int64 tokens, query-major -> (Q, E) float32 unit query features.

    ``truncate``: cut each batch's context to its longest prompt (valid for end-of-text pooling).
    """
    lengths = token_lengths(tokens) if truncate else np.full(len(tokens), tokens.shape[1])
    order = np.argsort(lengths, kind="stable")
    feats: Optional[np.ndarray] = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        out = unit(np.asarray(encode(tokens[idx, :int(lengths[idx].max())]), dtype=np.float32))
        if feats is None:
            feats = np.empty((len(order), out.shape[1]), dtype=np.float32)
        feats[idx] = out
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    assert feats is not None, "at least one prompt"
    return unit(feats.reshape(num_queries, -1, feats.shape[1]).mean(axis=1)).astype(np.float32)
