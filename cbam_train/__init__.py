"""cbam-train: staged fine-tuning of ResNet18 with CBAM attention."""

__version__ = "0.1.0"
