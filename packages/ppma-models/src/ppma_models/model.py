"""The PPMA vision transformer: classifier, or dense multi-scale backbone (docs/design.md §2.5)."""

from __future__ import annotations

from collections.abc import Sequence

import ppma_ops
import torch
from torch import nn

from .backbone import PPMAStage, Stem
from .config import PPMAConfig
from .decay import DecayField
from .head import ClassifierHead

#: LayerNorm on each dense output (PyTorch's default eps, as in the authors' dense backbone).
OUT_NORM_EPS = 1e-5


class PPMA(nn.Module):
    """Polyline Path Masked Attention vision transformer.

    Classifier mode (default): ``forward(x)`` → logits (B, num_classes).
    Features mode (``features_only=True``): no head; ``forward(x)`` → list of NCHW maps, one
    per entry of ``out_indices`` (default: every stage; stage i has stride
    ``config.strides[i]`` = stem_stride·2^i, 4·2^i by default, and
    ``config.dims[i]`` channels), each through its own LayerNorm.

    Input x: (B, in_chans, H, W), any H, W ≥ 1 (odd sizes round up at each stride-2 step).
    The masked attention and the blocks' depthwise convolutions are ``ppma_ops`` calls; which
    implementation runs them (fused kernels or the plain-PyTorch reference) is chosen in
    ppma_ops, process-wide: ``with ppma_ops.use_backend("reference"): model(x)``.
    """

    def __init__(
        self,
        config: PPMAConfig,
        *,
        num_classes: int = 1000,
        features_only: bool = False,
        out_indices: Sequence[int] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.name = name
        self.features_only = features_only
        n = config.num_stages
        if out_indices is None:
            out_indices = range(n)
        out_indices = tuple(sorted(int(i) for i in out_indices))
        if features_only:
            if not out_indices or any(not 0 <= i < n for i in out_indices):
                raise ValueError(
                    f"out_indices must be stage indices in [0, {n}), got {out_indices}"
                )
            if len(set(out_indices)) != len(out_indices):
                raise ValueError(f"out_indices has duplicates: {out_indices}")
        self.out_indices = out_indices
        self.in_chans = config.in_chans

        self.stem = Stem(config.in_chans, config.dims[0], config.stem_stride)
        # Stochastic depth rises linearly from 0 over all blocks of all stages.
        total = sum(config.depths)
        rates = torch.linspace(0, config.drop_path_rate, total, device="cpu").tolist()
        self.stages = nn.ModuleList()
        start = 0
        for i in range(n):
            depth = config.depths[i]
            self.stages.append(
                PPMAStage(
                    config.dims[i],
                    depth,
                    config.heads[i],
                    config.mlp_ratios[i],
                    config.attention_kinds[i],
                    in_dim=config.dims[i - 1] if i > 0 else None,
                    drop_paths=rates[start : start + depth],
                    layer_scale=config.layer_scale[i],
                    layer_scale_init=config.layer_scale_init,
                )
            )
            start += depth
        self.feature_info = [
            {"num_chs": config.dims[i], "reduction": config.strides[i], "module": f"stages.{i}"}
            for i in range(n)
        ]
        if features_only:
            self.out_norms = nn.ModuleDict(
                {str(i): nn.LayerNorm(config.dims[i], eps=OUT_NORM_EPS) for i in out_indices}
            )
            self.head = None
            self.num_classes = 0
        else:
            self.out_norms = None
            self.head = ClassifierHead(config.dims[-1], num_classes, config.head_hidden)
            self.num_classes = num_classes
        # timm's names: the channels of forward_features and of forward_head(pre_logits=True).
        self.num_features = config.dims[-1]
        self.head_hidden_size = config.head_hidden if self.head is not None else self.num_features
        # Model-wide init runs last and overrides the submodules' own (docs/design.md §2.5).
        self.apply(_init_weights)

    # ----------------------------------------------------------------------------- settings
    @property
    def attention(self) -> str:
        """The ppma_ops backend the model's ops run on now (``ppma_ops.get_backend()``)."""
        return ppma_ops.get_backend()

    @staticmethod
    def set_attention(name: str) -> None:
        """Alias of ``ppma_ops.set_backend(name)``: "native" or "reference".

        The choice is process-wide (every model and every ppma_ops call), not per model;
        ``with ppma_ops.use_backend(name):`` limits it to a block of code.
        """
        ppma_ops.set_backend(name)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Full names of parameters that must not be weight-decayed (decay-field dt_bias/A_log)."""
        names = set()
        for prefix, m in self.named_modules():
            if isinstance(m, DecayField):
                names.update(f"{prefix}.{p}" for p in m.no_weight_decay())
        return names

    def feature_channels(self) -> list[int]:
        """Channels of the maps returned in features mode, in order."""
        return [self.config.dims[i] for i in self.out_indices]

    def reset_classifier(
        self, num_classes: int, global_pool: str | None = None, reset_other: bool = False
    ) -> None:
        """A new final layer for ``num_classes`` (0: pooled features), with timm's signature.

        global_pool: PPMA's head always averages, so only None, "" or "avg" are taken.
        reset_other: also drop the head's projection to 1024 channels (and its BatchNorm and
        Swish): the pooled features are then the last stage's ``num_features`` channels.
        """
        if global_pool not in (None, "", "avg"):
            raise ValueError(f"global_pool: PPMA's head averages; got {global_pool!r}")
        if self.head is None:
            raise RuntimeError("reset_classifier: a features_only model has no classifier")
        self.head.reset(num_classes, reset_other=reset_other)
        self.num_classes = num_classes
        self.head_hidden_size = self.head.hidden

    # ------------------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"x has {x.shape[1]} channels but the model expects in_chans={self.in_chans} "
                f"(input shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
        weight = self.stem.conv1.weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model is on {weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the model's weights are {weight.dtype} "
                "(convert one of them, or run under torch.autocast)"
            )

    def _stage_outputs(self, x: torch.Tensor, last: int):
        """Yield (i, channels-last output of stage i) for i = 0..last."""
        self._check_input(x)
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i > last:
                break
            x = stage(x)
            yield i, x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage features (B, C_4, H/32, W/32) in NCHW, before the head."""
        y = x
        for _, y in self._stage_outputs(x, len(self.stages) - 1):  # noqa: B007
            pass
        return y.permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NCHW last-stage features → logits, or the pooled (B, 1024) vector if pre_logits."""
        if self.head is None:
            raise RuntimeError("forward_head: a features_only model has no classifier head")
        return self.head(x.permute(0, 2, 3, 1), pre_logits=pre_logits)

    def _take_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        """Stage indices from timm's ``indices``: a list (negative counts from the end), an
        int n for the last n stages, or None for all."""
        n = len(self.stages)
        if indices is None:
            return list(range(n))
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"indices as a count must be in [1, {n}], got {indices}")
            return list(range(n - indices, n))
        wanted = [int(i) % n if -n <= int(i) < n else int(i) for i in indices]
        if not wanted or any(not 0 <= i < n for i in wanted):
            raise ValueError(f"indices must be stage indices in [0, {n}), got {list(indices)}")
        return wanted

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs, with timm's signature.

        indices: stage indices, or an int n for the last n stages (default: all).
        norm: apply the per-stage LayerNorm (features-mode models only).
        output_fmt: "NCHW" or "NHWC". Returns the list of intermediates, or
        (final NCHW features, intermediates) unless ``intermediates_only``.
        """
        wanted = self._take_indices(indices)
        n = len(self.stages)
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        if norm:
            missing = [i for i in wanted if self.out_norms is None or str(i) not in self.out_norms]
            if missing:
                raise ValueError(f"norm=True: no per-stage LayerNorm for stage(s) {missing}")
        last = max(wanted) if (stop_early or intermediates_only) else n - 1
        feats = []
        final = None
        for i, y in self._stage_outputs(x, last):
            if i in wanted:
                z = self.out_norms[str(i)](y) if norm else y
                feats.append(z.permute(0, 3, 1, 2) if output_fmt == "NCHW" else z)
            final = y
        if intermediates_only:
            return feats
        return final.permute(0, 3, 1, 2), feats

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop what ``forward_intermediates(x, indices)`` does not need, as timm's models do:
        the stages after the last index and (``prune_head``) the classifier head. Returns the
        stage indices to take.

        prune_norm: accepted for timm's signature; PPMA has no norm between its last stage
        and the head, and a features-mode model keeps the LayerNorms of the kept stages.
        """
        take = self._take_indices(indices)
        keep = max(take) + 1
        self.stages = self.stages[:keep]
        self.feature_info = self.feature_info[:keep]
        if self.out_norms is not None:
            self.out_norms = nn.ModuleDict(
                {k: m for k, m in self.out_norms.items() if int(k) < keep}
            )
        self.out_indices = tuple(i for i in self.out_indices if i < keep)
        if prune_head:
            self.head = None
            self.num_classes = 0
        return take

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            return self.forward_intermediates(
                x, self.out_indices, norm=True, intermediates_only=True
            )
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
