"""ltpipe: a reproducible pipeline for long-tailed image recognition on CLIP features."""

__version__ = "0.1.0"
