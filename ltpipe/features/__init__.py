"""CLIP feature extraction, the HDF5 feature cache and model weights."""
