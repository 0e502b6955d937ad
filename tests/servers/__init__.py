"""Real servers for the tests: single-node SLURM, an S3-compatible object store, headless Chromium.

The fixtures (``slurm``, ``s3_server``, ``chromium``) are in :mod:`fixtures`; ``start-slurm.sh``
starts munge and SLURM on this host (``.ci/run`` runs it after installing the Debian packages).
"""
