"""Probing: the paper's four heads, their training on streamed batches, results tables.

- ``pooling``: adaptive avg/max pooling of stored maps (numpy and dask).
- ``heads``: linear, MLP, CNN and attention heads (2307.08702's four) as torch modules.
- ``training``: trains a group of heads on one feature slice from minibatches.
- ``results``: the accuracy Dataset over block x timestep x pool x head, best cells.

May import: ``pipeline.errors``, ``pipeline.store``; never ``stages`` or the workflow.
"""
