"""The embedded default model: a small GPT-style decoder.

Any module can replace it through `model.factory` (dist_train.tasks says what its
output must be for each task).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_train.config import ModelConfig
from dist_train.files import declared_kwargs, resolve_spec
from dist_train.errors import ConfigError, describe, is_out_of_memory


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.block_size = cfg.block_size
        self.tok = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.apply(self._init)
        # Scaled init of residual projections keeps the residual stream's variance
        # independent of depth (GPT-2).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds model.block_size={self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_model(cfg: ModelConfig, task: Any, vocab_size: Optional[int]) -> nn.Module:
    """The configured model: model.factory's, or the embedded TinyGPT (a language model, for token data).

    A factory is a function or a class, called with the keyword arguments it declares out of `cfg` (the
    model section), `vocab_size` (token data) and `num_classes` (task classify). One that raises or returns
    something other than a module instance is a one-line ConfigError naming model.factory.
    """
    if cfg.factory is None:
        if vocab_size is None or task.name not in ("lm", "custom"):
            raise ConfigError(f"config key 'model.factory': task {task.name} needs a model of your own (the embedded "
                              "model is a language model over token data); set model.factory=package.module:name")
        return TinyGPT(cfg, vocab_size)
    key = f"config key 'model.factory': '{cfg.factory}'"
    fn = resolve_spec(cfg.factory, "model.factory")
    kwargs = declared_kwargs(fn, "model.factory", {"cfg": cfg, "vocab_size": vocab_size,
                                                   "num_classes": getattr(task, "num_classes", None)})
    try:
        model = fn(**kwargs)
    except ConfigError:
        raise
    except Exception as e:
        if is_out_of_memory(e):
            raise ConfigError(f"{key} ran out of memory building the model; use a smaller model") from None
        raise ConfigError(f"{key} raised {describe(e)} (called with {', '.join(kwargs) or 'no arguments'})") from None
    if isinstance(model, type):
        raise ConfigError(f"{key} returned the class {model.__name__}, not an instance of it")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key} returned {type(model).__name__}, not a torch.nn.Module")
    return model
