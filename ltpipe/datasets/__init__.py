"""Dataset sources: the benchmarks' list formats, CIFAR-LT, the generated default and custom lists,
keyed by the names users type (`dataset:`), and the `prepare` stage that turns one into a manifest.
Only `prepare` imports this package: extraction and training read the manifest (:mod:`ltpipe.data`)."""
