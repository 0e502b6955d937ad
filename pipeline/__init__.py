"""diffprobe's library: everything the stages compose, one subpackage per concern.

Small shared basics at the top (``errors``, ``noise``, ``hooks``, ``faults``, ``interrupts``); then
``workflow`` (YAML, hashing, the Stage contract, the runner), ``store`` (the Zarr
format, its one write protocol and readers), ``models`` (adapters and their registry),
``datasets`` (readers in native layouts, preprocessing recipes), ``probing`` (heads,
training, results), ``cka``, ``dc`` (the Diffusion Classifier), ``cluster`` (dask
clients and task running) and ``cli``. Only ``cli`` imports ``stages`` (the registry);
the stages in ``stages/`` import from here, never the other way round.
"""

__version__ = "0.1.0"
#: Bumped when the store layout changes; part of every stage hash.
FORMAT_VERSION = 1
