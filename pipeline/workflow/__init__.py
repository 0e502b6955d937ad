"""Workflow machinery: YAML loading, validation, hashing, the Stage contract, the runner.

- ``config``: YAML -> frozen dataclasses with ``file:line`` messages; canonical JSON and
  the content hash of a stage.
- ``stage``: the Stage contract (``Stage``, ``RunContext``, ``input_field``).
- ``runner``: resolves outputs, checks inputs, skips / resumes / refuses by hash, runs.
- ``identity``: a dataset's identity (ordered image ids) as it enters a stage hash.
- ``claims``: leases, one writer per unit / shard / stage run, surviving crashes (local or on object storage).

Knows no concrete stage: the registry (``stages.STAGES``) is passed in by the CLI.
May import: ``pipeline.errors``, ``pipeline.store``, the cluster config; never ``stages``.
"""
