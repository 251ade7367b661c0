"""ssmooth: certified robustness by randomized smoothing, with sample-wise noise levels."""

__version__ = "0.1.0"
