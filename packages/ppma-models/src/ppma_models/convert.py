"""Converter between the authors' checkpoint layout ("upstream") and ours.

This is the only module that knows the legacy upstream names (``patch_embed.proj.N``,
``layers.i``, ``retention``, ``path_embed``, ``Relpos.angle``, ``retention_layer_norm``,
``final_layer_norm``, ``gamma_1``, ``outnorm{i}``, ...). Everything else in the package uses
names that say what the tensors are.

Differences besides names:
* upstream puts the downsampling at the end of stage i, we put it at the start of stage i+1;
* the layer-scale vectors are (1, 1, 1, C) upstream and (C,) here;
* ``layers.i.Relpos.angle`` is a constant (the rotary frequencies): on import it is checked
  against the recomputed frequencies and dropped; on export it is regenerated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .config import PPMAConfig
from .rope import rotary_frequencies

__all__ = [
    "AngleMismatchError",
    "convert_from_upstream",
    "convert_to_upstream",
    "from_upstream_kwargs",
    "is_upstream_state_dict",
    "to_upstream_kwargs",
]


class AngleMismatchError(ValueError):
    """An upstream ``Relpos.angle`` buffer differs from the rotary frequencies we compute."""


# Stem: index in upstream's nn.Sequential ↔ our submodule (GELUs at 2, 5, 8 have no state).
_STEM = {"0": "conv1", "1": "norm1", "3": "conv2", "4": "norm2",
         "6": "conv3", "7": "norm3", "9": "conv4", "10": "norm4"}  # fmt: skip
_STEM_BACK = {v: k for k, v in _STEM.items()}

# Inside a block: (upstream suffix, our suffix), most specific first.
_BLOCK = (
    ("pos.conv.", "cpe."),
    ("retention_layer_norm.", "attn_norm."),
    ("retention.path_embed.dt_linear.", "attn.decay.proj."),
    ("retention.path_embed.dt_bias", "attn.decay.dt_bias"),
    ("retention.path_embed.A_log", "attn.decay.A_log"),
    ("retention.lepe.conv.", "attn.lepe."),
    ("retention.", "attn."),
    ("final_layer_norm.", "ffn_norm."),
    ("ffn.dwconv.conv.", "ffn.dwconv."),
    ("ffn.", "ffn."),
    ("gamma_1", "attn_layer_scale"),
    ("gamma_2", "ffn_layer_scale"),
)
_DOWNSAMPLE = (("reduction.", "conv."), ("norm.", "norm."))
_HEAD = (("proj.", "head.proj."), ("norm.", "head.norm."), ("head.", "head.fc."))

_UP_STEM = re.compile(r"^patch_embed\.proj\.(\d+)\.(.+)$")
_UP_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_UP_DOWN = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
_UP_ANGLE = re.compile(r"^layers\.(\d+)\.Relpos\.angle$")
_UP_OUTNORM = re.compile(r"^outnorm(\d+)\.(.+)$")

_OUR_STEM = re.compile(r"^stem\.(\w+?)\.(.+)$")
_OUR_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
_OUR_DOWN = re.compile(r"^stages\.(\d+)\.downsample\.(.+)$")
_OUR_OUTNORM = re.compile(r"^out_norms\.(\d+)\.(.+)$")


def _swap_prefix(rest: str, table: tuple[tuple[str, str], ...], reverse: bool) -> str | None:
    for up, ours in table:
        src, dst = (ours, up) if reverse else (up, ours)
        if rest.startswith(src):
            return dst + rest[len(src) :]
    return None


def upstream_key_to_ours(key: str) -> str | None:
    """Our name for an upstream key; None if the key is not part of the upstream layout."""
    if m := _UP_STEM.match(key):
        sub = _STEM.get(m[1])
        return f"stem.{sub}.{m[2]}" if sub else None
    if m := _UP_BLOCK.match(key):
        rest = _swap_prefix(m[3], _BLOCK, reverse=False)
        return f"stages.{m[1]}.blocks.{m[2]}.{rest}" if rest else None
    if m := _UP_DOWN.match(key):
        rest = _swap_prefix(m[2], _DOWNSAMPLE, reverse=False)
        return f"stages.{int(m[1]) + 1}.downsample.{rest}" if rest else None
    if m := _UP_OUTNORM.match(key):
        return f"out_norms.{m[1]}.{m[2]}"
    return _swap_prefix(key, _HEAD, reverse=False)


def our_key_to_upstream(key: str) -> str | None:
    """The upstream name for one of our keys; None if it has no upstream counterpart."""
    if m := _OUR_STEM.match(key):
        idx = _STEM_BACK.get(m[1])
        return f"patch_embed.proj.{idx}.{m[2]}" if idx else None
    if m := _OUR_BLOCK.match(key):
        rest = _swap_prefix(m[3], _BLOCK, reverse=True)
        return f"layers.{m[1]}.blocks.{m[2]}.{rest}" if rest else None
    if m := _OUR_DOWN.match(key):
        rest = _swap_prefix(m[2], _DOWNSAMPLE, reverse=True)
        return f"layers.{int(m[1]) - 1}.downsample.{rest}" if rest else None
    if m := _OUR_OUTNORM.match(key):
        return f"outnorm{m[1]}.{m[2]}"
    # Longest our-prefix first so "head.proj." is not taken for "head.".
    for up, ours in sorted(_HEAD, key=lambda p: -len(p[1])):
        if key.startswith(ours):
            return up + key[len(ours) :]
    return None


def is_upstream_state_dict(state: Mapping[str, object]) -> bool:
    """True if the keys follow the authors' layout (``patch_embed.``/``layers.``)."""
    return any(k.startswith(("patch_embed.", "layers.")) for k in state)


def _is_layer_scale(key: str) -> bool:
    return key.endswith(("gamma_1", "gamma_2", "attn_layer_scale", "ffn_layer_scale"))


def convert_from_upstream(
    state: Mapping[str, torch.Tensor],
    config: PPMAConfig | None = None,
    *,
    check_angles: bool = True,
) -> dict[str, torch.Tensor]:
    """Upstream state dict → ours.

    ``Relpos.angle`` buffers are compared with the recomputed rotary frequencies
    (:class:`AngleMismatchError` if they differ, or if their length disagrees with
    ``config``'s head size) and dropped. Keys outside the upstream layout are passed
    through unchanged, so ``load_state_dict`` reports them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := _UP_ANGLE.match(key):
            if check_angles:
                _check_angle(key, value, int(m[1]), config)
            continue
        new = upstream_key_to_ours(key)
        if new is None:
            out[key] = value
            continue
        if _is_layer_scale(key) and isinstance(value, torch.Tensor):
            value = value.reshape(-1)
        out[new] = value
    return out


def _check_angle(key: str, angle: torch.Tensor, stage: int, config: PPMAConfig | None) -> None:
    angle = torch.as_tensor(angle)
    if angle.dim() != 1:
        raise AngleMismatchError(f"{key}: expected a 1-D buffer, got shape {tuple(angle.shape)}")
    d = angle.numel()
    if config is not None:
        if stage >= config.num_stages:
            raise AngleMismatchError(f"{key}: the model has only {config.num_stages} stages")
        if d != config.head_dims[stage]:
            raise AngleMismatchError(
                f"{key}: length {d} but the model's stage {stage} head size is "
                f"{config.head_dims[stage]}"
            )
    if angle.device.type == "meta":
        return
    expected = rotary_frequencies(d, torch.float64)
    if not torch.allclose(angle.double(), expected, rtol=1e-6, atol=1e-9):
        worst = (angle.double() - expected).abs().max().item()
        raise AngleMismatchError(
            f"{key}: the checkpoint's rotary frequencies differ from 1/10000^linspace(0, 1, "
            f"{d // 2}) (max abs diff {worst:.3g}); this checkpoint uses a different position "
            "embedding and cannot be loaded faithfully"
        )


def convert_to_upstream(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict → the authors' layout, regenerating every ``layers.i.Relpos.angle``.

    The head size of stage i is read from its decay-field weight (shape (2, d)). Keys with
    no upstream counterpart raise ``KeyError``.
    """
    out: dict[str, torch.Tensor] = {}
    head_dims: dict[int, tuple[int, torch.Tensor]] = {}
    for key, value in state.items():
        new = our_key_to_upstream(key)
        if new is None:
            raise KeyError(f"{key!r} has no counterpart in the upstream layout")
        if _is_layer_scale(key):
            value = value.reshape(1, 1, 1, -1)
        out[new] = value
        if (m := _OUR_BLOCK.match(key)) and m[3] == "attn.decay.proj.weight":
            head_dims.setdefault(int(m[1]), (value.shape[-1], value))
    for stage, (d, like) in sorted(head_dims.items()):
        out[f"layers.{stage}.Relpos.angle"] = rotary_frequencies(d).to(like.device)
    # A stable sort on the module position keeps the order within each module.
    return dict(sorted(out.items(), key=lambda kv: _upstream_position(kv[0])))


def _upstream_position(key: str) -> tuple[int, int, int]:
    """Where a key's module sits in the authors' model: stem, layers (angle, blocks,
    downsample), then head and dense norms."""
    if _UP_STEM.match(key):
        return (0, 0, 0)
    if m := _UP_ANGLE.match(key):
        return (1, int(m[1]), -1)
    if m := _UP_BLOCK.match(key):
        return (1, int(m[1]), int(m[2]))
    if m := _UP_DOWN.match(key):
        return (1, int(m[1]), 10**9)
    return (2, 0, 0)


def from_upstream_kwargs(kwargs: Mapping[str, object]) -> tuple[PPMAConfig, int]:
    """(config, num_classes) from the authors' ``PPMAViT(**kwargs)`` arguments.

    ``init_values`` and ``heads_ranges`` are accepted and ignored: upstream keeps them from RMT
    but PPMA never uses them.
    """
    known = {
        "embed_dims", "depths", "num_heads", "init_values", "heads_ranges", "mlp_ratios",
        "drop_path_rate", "chunkwise_recurrents", "layerscales", "layer_init_values",
        "num_classes", "in_chans", "projection", "use_checkpoints", "norm_layer", "patch_norm",
    }  # fmt: skip
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown upstream PPMAViT argument(s): {unknown}")
    dims = tuple(int(d) for d in kwargs["embed_dims"])
    n = len(dims)
    criss_cross = kwargs.get("chunkwise_recurrents", (True, True, False, False))  # upstream default
    config = PPMAConfig(
        dims=dims,
        depths=tuple(int(d) for d in kwargs["depths"]),
        heads=tuple(int(h) for h in kwargs["num_heads"]),
        mlp_ratios=tuple(kwargs.get("mlp_ratios", (3,) * n)),
        attention_kinds=tuple("X" if c else "V" for c in criss_cross),
        drop_path_rate=float(kwargs.get("drop_path_rate", 0.1)),
        layer_scale=tuple(bool(s) for s in kwargs.get("layerscales", (False,) * n)),
        layer_scale_init=float(kwargs.get("layer_init_values", 1e-6)),
        head_hidden=int(kwargs.get("projection", 1024)),
        in_chans=int(kwargs.get("in_chans", 3)),
    )
    return config, int(kwargs.get("num_classes", 1000))


def to_upstream_kwargs(config: PPMAConfig, num_classes: int = 1000) -> dict[str, object]:
    """The authors' ``PPMAViT`` arguments for ``config`` (inverse of from_upstream_kwargs)."""
    return {
        "embed_dims": list(config.dims),
        "depths": list(config.depths),
        "num_heads": list(config.heads),
        "mlp_ratios": list(config.mlp_ratios),
        "drop_path_rate": config.drop_path_rate,
        "chunkwise_recurrents": [k == "X" for k in config.attention_kinds],
        "layerscales": list(config.layer_scale),
        "layer_init_values": config.layer_scale_init,
        "projection": config.head_hidden,
        "in_chans": config.in_chans,
        "num_classes": num_classes,
    }
