"""Tokenizers of the text towers that build zero-shot heads: open_clip's BPE for the real models,
and CLIP's BPE cut down to the embedded benchmark's captions for its tiny CLIP."""
from __future__ import annotations

import functools
import hashlib
import json
import os

import open_clip
import torch

from taskmerge.models.encoders import _CONFIG_DIR, TINY_MODEL, _register_configs, backbone_of, open_clip_name


class PrunedBPETokenizer:
    """CLIP's BPE tokenizer restricted to the embedded benchmark's vocabulary.

    Text is split exactly as open_clip's `SimpleTokenizer` splits it (lower-cased, cleaned, BPE);
    the CLIP ids that occur in the embedded tasks' captions (`model_configs/<model>-vocab.json`,
    every task's class names × templates) are renumbered 1..V in CLIP order, so the tiny text tower
    needs a V + 4 row token embedding instead of CLIP's 49,408. Ids: 0 pad, 1..V the kept tokens,
    V + 1 unknown, V + 2 start, V + 3 end of text — the largest, so open_clip's argmax text pooling
    finds it as it does for CLIP's own ids. Sequences are cut to `context_length` as open_clip
    does: the last kept position becomes end of text.

    Whole-word tokens give each class name its own embedding rows; the byte-level tokenizer this
    replaced spelled names out, and its heads' rows came out far more alike (measured: zero-shot
    heads of mean pairwise cosine 0.68 vs 0.60 on Digits, Textures 0.47 vs 0.23)."""

    def __init__(self, bpe_ids: list[int], context_length: int):
        from open_clip.tokenizer import SimpleTokenizer
        self.bpe = SimpleTokenizer()
        self.ids = {clip_id: i + 1 for i, clip_id in enumerate(sorted(bpe_ids))}
        self.unknown, self.sot = len(self.ids) + 1, len(self.ids) + 2
        self.eot = self.vocab_size - 1
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return len(self.ids) + 4

    @staticmethod
    def vocabulary(texts: list[str]) -> list[int]:
        """The sorted CLIP BPE ids that `texts` use: what `<model>-vocab.json` holds."""
        from open_clip.tokenizer import SimpleTokenizer
        bpe = SimpleTokenizer()
        return sorted({i for text in texts for i in bpe.encode(text)})

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.ids.get(t, self.unknown) for t in self.bpe.encode(text)]
            ids = [self.sot] + ids[: self.context_length - 2] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def tiny_vocabulary_path(model_name: str = TINY_MODEL) -> str:
    return os.path.join(_CONFIG_DIR, f"{model_name}-vocab.json")


def get_tokenizer(model_name: str):
    """The tokenizer of `model_name`'s text tower; open_clip's BPE ships with the package."""
    if model_name == TINY_MODEL:
        _register_configs()
        text_cfg = open_clip.get_model_config(TINY_MODEL)["text_cfg"]
        with open(tiny_vocabulary_path(model_name)) as f:
            tokenizer = PrunedBPETokenizer(json.load(f)["bpe_ids"], text_cfg["context_length"])
        if tokenizer.vocab_size != text_cfg["vocab_size"]:
            raise ValueError(f"{tiny_vocabulary_path(model_name)} gives a vocabulary of "
                             f"{tokenizer.vocab_size} ids but the {model_name} config expects "
                             f"{text_cfg['vocab_size']}: regenerate one from the other")
        return tokenizer
    # an architecture read from a checkpoint's config keeps its backbone's tokenizer (its
    # context length and vocabulary are shapes, equal to the backbone's: hf_encoders.checkpoint_arch)
    return open_clip.get_tokenizer(open_clip_name(backbone_of(model_name)))


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def tokenizer_identity(model_name: str) -> str:
    """What a zero-shot head's cache key names as its tokenizer: the kind and a digest of its
    vocabulary file. The fusionbench family uses open_clip's BPE as well: its ids equal those of
    transformers' CLIPTokenizer of the openai folders (same vocabulary and merges) for every
    FusionBench class name and template, KMNIST's hiragana included (tests/test_fusionbench_heads.py)."""
    if model_name == TINY_MODEL:
        return f"taskmerge pruned BPE, {os.path.basename(tiny_vocabulary_path(model_name))} " \
               f"sha256:{_file_sha256(tiny_vocabulary_path(model_name))}"
    from open_clip.tokenizer import default_bpe
    tokenizer = get_tokenizer(model_name)
    return (f"open_clip SimpleTokenizer, {os.path.basename(default_bpe())} sha256:"
            f"{_file_sha256(default_bpe())}, context {tokenizer.context_length}")
