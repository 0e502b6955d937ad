"""What the latent-space adapters (Stable Diffusion, DiT) share: loading a component
from a local diffusers folder, the VAE encoder, and the epsilon-prediction check.

Images are encoded once with the deterministic posterior mean, as the Diffusion
Classifier does (Li et al. 2023): ``z = (mean - shift_factor) * scaling_factor``,
with ``scaling_factor`` read from ``vae/config.json`` (0.18215 for SD 1.x and DiT).
The VAE stays in float32 whatever the compute dtype, and follows the denoiser to its
device on first use (``load_model`` only moves ``adapter.module``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ModelError
from pipeline.models.base import component_folder
from pipeline.models.imports import diffusers_module


def local_folder(cfg_path: str | None, kind: str) -> Path:
    """``model.path`` as an existing folder, or a ModelError that says what is expected."""
    if not cfg_path:
        raise ModelError(f"model kind {kind!r} needs 'path:' (a local diffusers pipeline folder)")
    folder = Path(cfg_path).expanduser()
    if not folder.exists():
        raise ModelError(f"model path {str(folder)!r} does not exist; "
                         "point 'model.path' at a local diffusers folder")
    if not folder.is_dir():
        raise ModelError(
            f"model path {str(folder)!r} is not a folder; point 'model.path' at a local diffusers folder"
        )
    return folder


#: Config ``_class_name`` values each denoiser class loads (the hub's DiT folders say
#: ``Transformer2DModel``).
CLASS_ALIASES = {"DiTTransformer2DModel": ("DiTTransformer2DModel", "Transformer2DModel")}


def _quiet_diffusers():
    """diffusers' logger at error level while loading: its fallbacks print several lines
    (accelerate advice, "Defaulting to unsafe serialization") before the error we report."""
    import contextlib

    from diffusers.utils import logging as dlogging

    @contextlib.contextmanager
    def quiet():
        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()
        try:
            yield
        finally:
            dlogging.set_verbosity(level)

    return quiet()


def check_weights(cls, folder: Path, what: str, variant: str | None) -> None:
    """A model folder must hold weights; say which file, and how to get a random-init model instead."""
    from diffusers.models.modeling_utils import ModelMixin

    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        return  # tokenizers have no weights
    stem = "diffusion_pytorch_model" if issubclass(cls, ModelMixin) else "model"
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.safetensors.index.json")):
        return
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    raise ModelError(
        f"no weights for the {what} in {str(folder)!r}: expected {name} (or a .bin) next to config.json; "
        "copy the weights there, or set random_init: true for a random-init model"
    )


def load_component(cls, folder: Path, what: str, variant: str | None = None) -> nn.Module:
    """``cls.from_pretrained(folder)`` offline; a ModelError naming the folder on failure."""
    from diffusers.models.modeling_utils import ModelMixin

    check_weights(cls, folder, what, variant)
    kwargs = {"local_files_only": True}
    if variant:
        kwargs["variant"] = variant
    if isinstance(cls, type) and issubclass(cls, ModelMixin):
        kwargs["low_cpu_mem_usage"] = False  # True needs accelerate, and without it diffusers says so at length
    try:
        with _quiet_diffusers():
            return cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the {what} ({cls.__name__}) from {str(folder)!r}: {first}") from None


def check_config_class(config, cls, where: str, what: str) -> None:
    """A config JSON for ``cls``: a dict, of that class (``_class_name``), sharing its arguments."""
    import inspect

    expected = CLASS_ALIASES.get(cls.__name__, (cls.__name__,))
    if not isinstance(config, dict):
        raise ModelError(f"{where} is not a model config (a JSON object); give a {cls.__name__} config.json")
    named = config.get("_class_name")
    if named is not None and named not in expected:
        raise ModelError(
            f"{where} is a config for {named}, not {cls.__name__} ({what}); point the model at the "
            f"{cls.__name__} config (for a pipeline folder, its denoiser's config.json)"
        )
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    keys = {k for k in config if not k.startswith("_")}
    if named is None and keys and not keys & params:
        raise ModelError(
            f"{where} has none of {cls.__name__}'s arguments (keys: {', '.join(sorted(keys)[:6])}); "
            f"give a {cls.__name__} config, e.g. with {', '.join(sorted(params)[:6])} ..."
        )


def build_from_config(cls, config: dict, where: str, what: str) -> nn.Module:
    """``cls.from_config(config)``, with the config checked first and diffusers' own errors made one line."""
    check_config_class(config, cls, where, what)
    try:
        with _quiet_diffusers():
            return cls.from_config(config)
    except (TypeError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"{where} is not a valid {cls.__name__} config: {first}") from None


def load_denoiser(cls, cfg, component: str, what: str, variant: str | None = None
                  ) -> tuple[nn.Module, Path | None, dict]:
    """The denoiser of a diffusers model kind, from where ``cfg`` says.

    ``model.path``: a local pipeline folder (``<component>/``) or model folder, with its
    weights, or with fresh weights from its config under ``random_init`` (the control
    twin); ``model.config``: a config JSON, random weights. Returns ``(module, folder or
    None, source)``, ``source`` being what the store's provenance records.
    """
    import json

    if cfg.path:
        folder = local_folder(cfg.path, cfg.kind)
        model_dir = component_folder(folder, component, what)
        config_file = model_dir / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except ValueError as exc:
            raise ModelError(f"{str(config_file)!r} is not valid JSON: {exc}") from None
        check_config_class(config, cls, repr(str(config_file)), what)
        if cfg.random_init:
            torch.manual_seed(cfg.seed)
            module = build_from_config(cls, config, repr(str(config_file)), what)
        else:
            module = load_component(cls, model_dir, what, variant)
        return module, folder, {"path": str(folder), "random_init": cfg.random_init,
                                "seed": cfg.seed if cfg.random_init else None}
    if cfg.config:
        config_path = Path(cfg.config).expanduser()
        if not config_path.exists():
            raise ModelError(f"model config {str(config_path)!r} does not exist")
        try:
            config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise ModelError(f"model config {str(config_path)!r} is not valid JSON: {exc}") from None
        torch.manual_seed(cfg.seed)
        module = build_from_config(cls, config, f"model config {str(config_path)!r}", what)
        return module, None, {"config": str(config_path), "random_init": True, "seed": cfg.seed}
    raise ModelError(f"model kind {cfg.kind!r} needs 'path:' (a local {what} folder) or 'config:' (config JSON)")


def check_epsilon(scheduler_config: dict, where: str) -> None:
    """The extract and classify stages assume the network predicts eps."""
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ModelError(
            f"{where}: scheduler prediction_type is {prediction!r}; only 'epsilon' models are supported "
            f"(v-prediction checkpoints such as SD 2.x 768-v are not yet)"
        )


class VaeEncoder:
    """Pixels in [-1, 1] (B, 3, H, W) -> scaled latents (B, C_lat, H / f, W / f), f = ``scale_factor``."""

    def __init__(self, vae_dir: Path, variant: str | None = None):
        AutoencoderKL = diffusers_module("diffusers.models.autoencoders.autoencoder_kl").AutoencoderKL

        self.vae = load_component(AutoencoderKL, vae_dir, "VAE", variant).float().eval().requires_grad_(False)
        conf = self.vae.config
        self.scale_factor = 2 ** (len(conf.block_out_channels) - 1)
        self.scaling_factor = float(conf.scaling_factor)
        self.shift_factor = float(getattr(conf, "shift_factor", None) or 0.0)
        self.in_channels = int(conf.in_channels)
        self.latent_channels = int(conf.latent_channels)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latents (posterior mean), float32 on ``x``'s device."""
        if next(self.vae.parameters()).device != x.device:
            self.vae.to(x.device)
        mean = self.vae.encode(x.float()).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor

    def provenance(self) -> dict:
        from pipeline.models.base import weights_hash

        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "scale_factor": self.scale_factor, "weights_sha256": weights_hash(self.vae)}
