"""Centered kernel alignment between stored representations.

- ``estimators``: linear CKA (feature and Gram forms, streamed over chunks).
- ``minibatch``: minibatch CKA with unbiased HSIC (Nguyen et al. 2021) and RBF CKA.
- ``select``: which stored slices are compared, and aligning samples across stores.
- ``results``: the CKA matrix as an xarray Dataset, written to Zarr.

May import: ``pipeline.errors``, ``pipeline.store``; never ``stages`` or the workflow.
"""
