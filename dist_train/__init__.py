"""dist_train: data-parallel PyTorch training whose logged and clipped
gradient norm is the true global norm."""

__version__ = "0.1.0"
