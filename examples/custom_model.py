"""Bring your own model: `dist-train train model.factory=examples.custom_model:build`.

A factory takes the `model` config section and the vocabulary size and returns
any torch.nn.Module that maps (batch, time) token ids to (batch, time, vocab)
logits. The package's loss is next-token cross-entropy over those logits.
"""

import torch
import torch.nn as nn

from dist_train.config import ModelConfig


class ConvLM(nn.Module):
    """A causal convolutional language model: each position sees the last `width` tokens."""

    def __init__(self, vocab_size: int, d_model: int, width: int = 4):
        super().__init__()
        self.width = width
        self.emb = nn.Embedding(vocab_size, d_model)
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=width)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(d_model, vocab_size))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx).transpose(1, 2)  # (B, C, T)
        h = nn.functional.pad(h, (self.width - 1, 0))  # left padding keeps it causal
        return self.out(self.conv(h).transpose(1, 2))


def build(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    return ConvLM(vocab_size, cfg.d_model)
