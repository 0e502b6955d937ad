"""The Diffusion Classifier (Li et al. 2023, arXiv 2303.16203), independent of any model.

- ``classifier``: trial plans (timesteps, shared eps), the adaptive elimination
  schedule and its driver, denoising losses.
- ``scoring``: class scores, accuracies and re-scoring from cached error tensors.

May import: ``pipeline.errors``, ``pipeline.noise``, ``pipeline.store``; never ``stages``.
"""
