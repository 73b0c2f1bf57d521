"""End-to-end fine-tuning of the CLIP image encoder (or CoOp's text prompts) with the
cached path's heads, losses and samplers: modes (:mod:`.modes`), the model
(:mod:`.model`), the training loop (:mod:`.train`) and the stage (:mod:`.run`)."""
