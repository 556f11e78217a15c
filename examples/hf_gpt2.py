"""Hugging Face models, with no wrapper: a GPT-2 from `transformers`, built from a config (no download).

As a language model (task lm: its output's `.logits`, next-token cross-entropy by dist_train):

    dist-train train --config configs/debug.yaml run.out_dir=runs/hf_lm model.factory=examples.hf_gpt2:gpt2

As a model computing its own loss (task model: `model(**batch).loss` on dict samples with `labels`,
Hugging Face's convention), on a Dataset from a factory:

    dist-train train --config configs/debug.yaml run.out_dir=runs/hf_model model.factory=examples.hf_gpt2:gpt2 \\
        data.factory=examples.hf_gpt2:progressions data.vocab_size=32
"""

from __future__ import annotations

import torch

from dist_train.config import DataConfig, ModelConfig


def gpt2(cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    """GPT2LMHeadModel sized by the model section (n_layer, n_head, d_model, block_size, dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2's own special tokens (id 50256) lie outside a small vocabulary: the last id stands for them here.
    config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # the loss of a causal LM's labels (transformers warns when it must guess)
    return model


class Progressions(torch.utils.data.Dataset):
    """Arithmetic progressions modulo V (dist_train's synthetic task) as Hugging Face samples:
    {"input_ids": (T,), "labels": (T,)}; the model shifts the labels itself."""

    def __init__(self, n: int, length: int, vocab_size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab_size, (n, 1), generator=g)
        stride = torch.randint(1, 5, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(length)) % vocab_size

    def __len__(self) -> int:
        return self.ids.size(0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def progressions(cfg: DataConfig, seed: int) -> dict[str, Progressions]:
    """data.factory: data.num_samples training sequences of 32 tokens below data.vocab_size, and a validation
    set of a tenth of that, from `seed`."""
    vocab = cfg.vocab_size or 32
    return {"train": Progressions(cfg.num_samples, 32, vocab, seed),
            "val": Progressions(max(cfg.num_samples // 10, 1), 32, vocab, seed + 1)}
