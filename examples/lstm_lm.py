"""A character-level LSTM language model: the recurrent setting of Pascanu et al. (2013) and Zhang et al.
(2020), where plain SGD's gradients explode and clipping decides whether training works at all.

    dist-train train --config configs/lstm_lm.yaml

The factory (`model.factory=examples.lstm_lm:LSTMLM`) takes the model section (`d_model` is the hidden
size, `n_layer` the stacked LSTM layers, `dropout` between them) and the vocabulary size of the text; it
maps (batch, time) character ids to (batch, time, vocab) logits, so the `lm` task trains it as it does
the embedded GPT.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dist_train.config import ModelConfig


class LSTMLM(nn.Module):
    """Embedding -> an n_layer LSTM -> a linear read-out to the vocabulary, its weight tied to the embedding."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, cfg.d_model)
        self.lstm = nn.LSTM(cfg.d_model, cfg.d_model, num_layers=cfg.n_layer, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.out = nn.Linear(cfg.d_model, vocab_size)
        self.out.weight = self.emb.weight  # tied (Press & Wolf 2017), as in AWD-LSTM

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(idx))  # a fresh zero state for every sample: samples are independent windows
        return self.out(h)
