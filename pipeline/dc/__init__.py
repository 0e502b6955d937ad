"""The Diffusion Classifier (Li et al. 2023, arXiv 2303.16203), independent of any model.

- ``classifier``: trial plans (timestep grid x noise draws, shared eps), the adaptive
  elimination schedule in rounds and its driver, denoising losses.
- ``prompts``: prompt sets (which prompts stand for which class), with the published
  sets shipped as package data in ``prompt_sets/``.
- ``scoring``: class scores, accuracies and re-scoring from cached error tensors.

May import: ``pipeline.errors``, ``pipeline.noise``, ``pipeline.store``; never ``stages``.
"""
