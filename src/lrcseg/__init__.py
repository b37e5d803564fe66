"""lrcseg: Localized Region Contrast pre-training for medical image segmentation."""

__version__ = "0.1.0"
