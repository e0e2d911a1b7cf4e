"""The text-embedding bank: one unit feature per query from the 80 OpenAI ImageNet templates.

Text attention is causal, so the end-of-text feature depends only on the tokens before it: prompts
are sorted by length and each batch runs with the context cut to its longest prompt. The features
equal the full 77-token run; the work shrinks several times.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import OPENAI_IMAGENET_TEMPLATES
from open_clip.transformer import text_global_pool

from resclip_deploy.errors import UserError

TEMPLATES = OPENAI_IMAGENET_TEMPLATES


def prompts_for(queries: Sequence[str]) -> list[str]:
    """Q queries -> Q·80 prompts, query-major."""
    return [template(q) for q in queries for template in TEMPLATES]


def tokenize(tokenizer: Callable[..., torch.Tensor], prompts: list[str]) -> torch.Tensor:
    tokens = tokenizer(prompts)
    full = tokens[:, -1] != 0
    if bool(full.any()):
        bad = prompts[int(full.nonzero()[0, 0])]
        raise UserError(f"class name too long for the text encoder's {tokens.shape[1]}-token "
                        f"context (prompt {bad!r}); shorten it")
    return tokens


def token_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token + 1 (padding id is 0)."""
    nonzero = (tokens != 0).flip(1).int()
    return tokens.shape[1] - nonzero.argmax(dim=1)


def encode_text_prefix(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) tokens with L <= context -> (B, E) text features, computed on the first L positions."""
    tower = getattr(model, "text", model)
    n = tokens.shape[1]
    x = tower.token_embedding(tokens) + tower.positional_embedding[:n]
    x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
    x = tower.ln_final(x)
    x = text_global_pool(x, tokens, tower.text_pool_type,
                         eos_token_id=getattr(tower, "text_eos_id", None))
    proj = tower.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


@torch.inference_mode()
def text_bank(model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor],
              queries: Sequence[str], batch_size: int = 512,
              progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """(Q, E) float32 unit query features: mean of the unit prompt features, normalised."""
    tokens = tokenize(tokenizer, prompts_for(queries))
    pool = getattr(getattr(model, "text", model), "text_pool_type", "argmax")
    # Only end-of-text pooling lets the context be cut; others run at full length.
    lengths = token_lengths(tokens) if pool in ("argmax", "eos") \
        else torch.full((len(tokens),), tokens.shape[1])
    order = torch.argsort(lengths, stable=True)
    device = next(model.parameters()).device
    feats = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        n = int(lengths[idx].max())
        out = F.normalize(encode_text_prefix(model, tokens[idx, :n].to(device)).float(), dim=-1)
        if feats is None:
            feats = torch.empty(len(order), out.shape[1], device=device)
        feats[idx.to(device)] = out
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    mean = feats.reshape(len(queries), len(TEMPLATES), -1).mean(dim=1)
    return F.normalize(mean, dim=-1).cpu().numpy().astype(np.float32)
