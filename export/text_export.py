"""--text-encoder: the text tower as an ONNX graph and CLIP's BPE as a Hugging Face `tokenizers`
file, so a runtime builds a new text bank without torch or open_clip.

The tokenizer is rebuilt from open_clip's own vocabulary and merges with the maintained
`tokenizers` library (the construction of transformers' CLIPTokenizerFast); the export checks its
tokens against open_clip's on every prompt of the bundle's vocabulary.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from resclip_deploy.bundle import OPSET
from resclip_deploy.errors import UserError
from resclip_deploy.runtime.text import encode_prompts
from resclip_deploy.textbank import prompts_for

from .text import TEMPLATES, encode_text_prefix, tokenize, truncatable

# open_clip's pre-tokenisation pattern without its two special tokens.
_CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_bpe_tokenizer(simple: SimpleTokenizer) -> Tokenizer:
    """open_clip's SimpleTokenizer as a `tokenizers` BPE (no special tokens added here)."""
    model = BPE(vocab=dict(simple.encoder), merges=[tuple(m) for m in simple.bpe_ranks],
                continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(),
                                           normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


class TextGraph(torch.nn.Module):
    """(B, L) int64 tokens, L <= context -> (B, E) float32 text features (not normalised)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return encode_text_prefix(self.model, tokens).float()


def export_text_encoder(model: torch.nn.Module, path: str) -> None:
    batch = torch.export.Dim("batch", min=1, max=100000)
    length = torch.export.Dim("length", min=2, max=int(model.positional_embedding.shape[0]))
    example = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 269, 49407],
                            [49406, 320, 2368, 269, 49407, 0, 0, 0]])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(TextGraph(model.float()).eval(), (example,), dynamo=True,
                                    opset_version=OPSET, input_names=["text_tokens"],
                                    output_names=["text_features"],
                                    dynamic_shapes=({0: batch, 1: length},), verbose=False)
    program.save(path, external_data=False)


def text_encoder_entry(clip_tokenizer: Any, model: torch.nn.Module,
                       queries: Sequence[str]) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer and the manifest entry; tokens are checked against open_clip's."""
    if not isinstance(clip_tokenizer, SimpleTokenizer):
        raise UserError("--text-encoder supports CLIP's BPE tokenizer (OpenAI, LAION, DataComp "
                        f"CLIP ViTs); this model uses {type(clip_tokenizer).__name__}")
    tok = clip_bpe_tokenizer(clip_tokenizer)
    entry = {"graph": "text_encoder.onnx", "tokenizer": "tokenizer.json",
             "context_length": int(clip_tokenizer.context_length),
             "sot": int(clip_tokenizer.sot_token_id), "eot": int(clip_tokenizer.eot_token_id),
             "templates": list(TEMPLATES), "truncate_context": truncatable(model)}
    prompts = prompts_for(queries, TEMPLATES)
    ours = encode_prompts(tok, prompts, entry["context_length"], entry["sot"], entry["eot"])
    theirs = tokenize(clip_tokenizer, prompts)
    if not np.array_equal(ours, theirs):
        bad = int(np.flatnonzero((ours != theirs).any(axis=1))[0])
        raise UserError(f"the exported tokenizer disagrees with open_clip on {prompts[bad]!r}; "
                        "export without --text-encoder")
    entry["tokens_checked"] = len(prompts)
    return tok, entry
