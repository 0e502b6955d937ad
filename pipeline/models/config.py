"""The model section of a workflow: where weights come from and how to condition."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load; nothing is ever downloaded.

    kind: ``unet2d`` (diffusers UNet2DModel), ``factory`` (any nn.Module from
        ``module:function``), ``sd`` (Stable Diffusion folder), ``dit`` (DiT folder).
    path: a folder, local or a URL (``s3://...``, copied to a local folder first:
        :mod:`pipeline.models.remote`). For unet2d either a pipeline folder (``unet/`` +
        ``scheduler/``) or a model folder (``config.json`` + weights).
    config: a model config JSON (local or a URL); the model is built with random weights (``seed``).
    random_init: load ``path``'s config but not its weights (a random-init twin).
    seed: torch seed for random weights.
    factory: ``package.module:function`` returning an nn.Module or a ModelAdapter;
        ``options`` are passed to it as keyword arguments.
    null_class: index of the null (unconditional) class embedding, if any.
    size: input size override (pixels), e.g. to list blocks at another resolution.
    scheduler: overrides for the noise schedule (``num_train_timesteps``,
        ``beta_schedule``, ``beta_start``, ``beta_end``); default DDPM linear, 1000 steps,
        or the folder's own ``scheduler/scheduler_config.json``.
    """

    kind: str = "unet2d"
    path: str | None = field(default=None, metadata={"path": "path"})
    config: str | None = field(default=None, metadata={"path": "path"})
    random_init: bool = False
    seed: int = 0
    factory: str | None = field(default=None, metadata={"path": "factory"})
    options: dict = field(default_factory=dict)
    null_class: int | None = None
    size: int | None = None
    scheduler: dict = field(default_factory=dict)
