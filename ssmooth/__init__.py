"""ssmooth: certified robustness by randomized smoothing, with sample-wise noise levels.

    model, meta = ssmooth.load_model("outputs/runs/RUN/checkpoints/last.ckpt")   # any ssmooth checkpoint
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Loaded on first use: `import ssmooth` (e.g. for the version) stays free of torch.
    if name == "load_model":
        from ssmooth.checkpoints import load_model

        return load_model
    raise AttributeError(f"module 'ssmooth' has no attribute {name!r}")
