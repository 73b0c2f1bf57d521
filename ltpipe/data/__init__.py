"""A prepared dataset: the manifest (images, labels, splits, content hashes), its class table,
and the one image loader. Extraction and training read these; the dataset sources that write
them live in :mod:`ltpipe.datasets` (which extraction never imports)."""
