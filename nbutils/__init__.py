"""Helpers shared by the portrait-studio notebooks: one module per capability, each imported on its own.

Foundation: ``runs`` (the results store: one folder per notebook run with config, metrics, images, artifacts),
``models`` (model tiers real/toy/tiny, device, dtype, pipeline loading), ``viz`` (image grids, curves, saved
figures), ``sampling`` (seeded batched generation). Data: ``photos`` (load and check the student's photos),
``faces`` (dlib detection and alignment), ``augment`` (augmentation, captions, the prepared dataset). Methods:
``train`` (the one training loop), ``textual_inversion``, ``pplus``, ``lora``, ``svdiff``, ``dreambooth``
(``class_images``: its prior's class-image cache), ``combos`` (DreamBooth + TI, LoRA + TI), ``exports`` (LoRA and
embedding files for A1111 / ComfyUI). Stylising:
``style_transfer`` (Gatys neural style transfer). Evaluation: ``metrics``, ``prompts``, ``resources``. Toy tier:
``toyworld`` (the procedural portrait world), ``toy_model`` (the miniature SD's parts), ``toy_evaluators``, and
``clip_bpe`` (SD1.5's CLIP tokenizer, built offline). Importing the package itself imports
nothing heavy (no torch, no diffusers): import the module you need, e.g. ``from nbutils.runs import new_run``.
"""
