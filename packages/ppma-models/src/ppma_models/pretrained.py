"""How a registered model's published weights expect to be fed: :class:`PretrainedCfg`.

The registry keeps one next to each architecture (as timm's ``pretrained_cfg``): the input
size and normalisation the weights were trained with, the evaluation crop, the licence, and
the names under which the authors publish them, so that checkpoint loading and the apps read
these facts from one place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

#: Per-channel RGB mean and std of ImageNet-1K (0–1 pixel scale): the normalisation the
#: published PPMA weights were trained with.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Resampling filters an input pipeline may be asked for.
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")

#: Where the authors publish the code and the checkpoints of PPMA-T/S/B (docs/design.md §3).
AUTHORS_REPOSITORY = "https://github.com/zhongchenzhao/PPMA"


@dataclass(frozen=True)
class PretrainedCfg:
    """Input and provenance settings of a model's pretrained weights.

    input_size: (channels, height, width) of the training/evaluation crops.
    mean, std: per-channel normalisation of 0–1 pixels, one entry per input channel.
    crop_pct: evaluation crop as a fraction of the resized image (resize the shorter side to
        size / crop_pct, then centre-crop ``size``).
    interpolation: resampling filter of that resize ("bicubic", "bilinear" or "nearest").
    num_classes: classes of the published classifier head.
    license: licence of the weights ("" when there are none).
    upstream_names: the authors' names for this model (``args.model`` in their checkpoints,
        e.g. "PPMAViT_T"); empty for models they did not publish.
    url: where the weights are published ("" when unknown or unpublished).
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    num_classes: int = 1000
    license: str = ""
    upstream_names: tuple[str, ...] = ()
    url: str = ""

    def __post_init__(self) -> None:
        # Lists are accepted (e.g. from JSON) and stored as tuples, so the value stays hashable.
        for name in ("input_size", "mean", "std", "upstream_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        channels = self.input_size[0] if len(self.input_size) == 3 else 0
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be (channels, height, width), got {self.input_size}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != channels:
                raise ValueError(f"{name} needs one entry per input channel ({channels})")
        if not all(s > 0 and math.isfinite(s) for s in self.std):
            raise ValueError(f"std entries must be positive, got {self.std}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")

    @classmethod
    def for_channels(cls, in_chans: int) -> PretrainedCfg:
        """Default settings for a model without published weights and ``in_chans`` inputs.

        Three channels get the ImageNet statistics; other counts repeat their channel average
        (a grey image's mean and spread are close to the average of its colour channels').
        """
        if in_chans == 3:
            return cls()
        mean = (sum(IMAGENET_MEAN) / 3,) * in_chans
        std = (sum(IMAGENET_STD) / 3,) * in_chans
        return cls(input_size=(in_chans, 224, 224), mean=mean, std=std)

    @property
    def published(self) -> bool:
        """True when the authors publish weights for this model."""
        return bool(self.upstream_names)

    def replace(self, **changes: object) -> PretrainedCfg:
        """A copy with some fields changed (checked like a new one)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready values (tuples as lists)."""
        items = dataclasses.asdict(self).items()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in items}
