"""Training on cached features: the loop (:mod:`.loop`), samplers, two-stage methods, sweep cells."""
