"""dist_train: data-parallel PyTorch training whose logged and clipped
gradient norm is the true global norm.

For your own training loop: `from dist_train import Clipper` (dist_train.clipper). The names
below are imported when first used, so `import dist_train` (and the launchers' probes) stay
free of torch.
"""

__version__ = "0.1.0"

#: Public names and the modules that define them.
_PUBLIC = {
    "Clipper": "dist_train.clipper", "ClipStats": "dist_train.clipper",
    "train_step": "dist_train.step", "StepMetrics": "dist_train.step",
    "ClipPolicy": "dist_train.clip", "NoClip": "dist_train.clip", "FixedClip": "dist_train.clip",
    "ZScoreClip": "dist_train.clip", "PercentileClip": "dist_train.clip", "AGC": "dist_train.clip",
    "SpikeSkip": "dist_train.clip",
    "release_deepspeed_shm": "dist_train.deepspeed_shm",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dist_train' has no attribute '{name}'")
