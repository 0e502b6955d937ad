"""diffprobe's framework: config, store, models, hooks, noise, datasets, runner.

Nothing in this package knows what a probe is; stages live in ``stages/``.
"""

__version__ = "0.1.0"
#: Bumped when the store layout changes; part of every stage hash.
FORMAT_VERSION = 1
