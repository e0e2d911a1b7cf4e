"""The text bank with open_clip's text tower in torch (bucketing: resclip_deploy.textbank)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from open_clip import OPENAI_IMAGENET_TEMPLATES
from open_clip.transformer import text_global_pool

from resclip_deploy.textbank import bank_from_tokens, check_fits, prompts_for

# The 80 OpenAI ImageNet templates as '{}' format strings (open_clip ships them as lambdas).
TEMPLATES = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def tokenize(tokenizer: Callable[..., torch.Tensor], prompts: list[str]) -> np.ndarray:
    tokens = tokenizer(prompts).numpy().astype(np.int64)
    check_fits(tokens, prompts)
    return tokens


def text_tower(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "text", model)


def truncatable(model: torch.nn.Module) -> bool:
    """Cutting the context is exact only when the feature is pooled at the end-of-text token."""
    return getattr(text_tower(model), "text_pool_type", "argmax") in ("argmax", "eos")


def encode_text_prefix(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) tokens, L <= context -> (B, E) text features computed on the first L positions."""
    tower = text_tower(model)
    n = tokens.shape[1]
    x = tower.token_embedding(tokens) + tower.positional_embedding[:n]
    x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
    x = tower.ln_final(x)
    # token ids as float32 (exact below 2**24): the exported graph's ArgMax then has a kernel in
    # ONNX Runtime's CUDA provider, which has none for int64
    x = text_global_pool(x, tokens.float(), tower.text_pool_type,
                         eos_token_id=getattr(tower, "text_eos_id", None))
    proj = tower.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


@torch.inference_mode()
def text_bank(model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor],
              queries: Sequence[str], batch_size: int = 512,
              progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """(Q, E) float32 unit query features from the 80-template prompts."""
    tokens = tokenize(tokenizer, prompts_for(queries, TEMPLATES))
    device = next(model.parameters()).device

    def encode(t: np.ndarray) -> np.ndarray:
        return encode_text_prefix(model, torch.from_numpy(t).to(device)).float().cpu().numpy()
    return bank_from_tokens(tokens, encode, len(queries), truncatable(model), batch_size,
                            progress)
