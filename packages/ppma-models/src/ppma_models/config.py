"""Architecture configuration of a PPMA model (docs/design.md §2.5)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

#: Attention kinds per stage, as written in the paper's table: "X" criss-cross, "V" vanilla.
ATTENTION_KINDS = ("X", "V")
#: Downsampling of the stem: the paper's 4, or 2 (its first convolution at stride 1).
STEM_STRIDES = (2, 4)


@dataclass(frozen=True)
class PPMAConfig:
    """Everything that fixes the architecture (and hence the parameter shapes).

    Per-stage tuples have one entry per stage. ``attention_kinds`` uses the paper's letters:
    "X" = criss-cross polyline attention (§2.4), "V" = vanilla polyline attention (§2.3).
    ``layer_scale`` switches the per-channel γ₁/γ₂ on per stage, initialised to
    ``layer_scale_init``. ``head_hidden`` is the width of the classifier's per-token projection.
    """

    dims: tuple[int, ...]
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    attention_kinds: tuple[str, ...]
    drop_path_rate: float = 0.0
    layer_scale: tuple[bool, ...] = (False, False, False, False)
    layer_scale_init: float = 1e-6
    head_hidden: int = 1024
    in_chans: int = 3
    stem_stride: int = 4

    def __post_init__(self) -> None:
        n = len(self.dims)
        for name in ("depths", "heads", "mlp_ratios", "attention_kinds", "layer_scale"):
            value = getattr(self, name)
            if len(value) != n:
                raise ValueError(
                    f"PPMAConfig.{name} must have one entry per stage ({n}), got {value!r}"
                )
        for i, (dim, heads) in enumerate(zip(self.dims, self.heads, strict=True)):
            if heads < 1 or dim % heads:
                raise ValueError(f"PPMAConfig.heads[{i}]={heads} must divide dims[{i}]={dim}")
            if (dim // heads) % 2:
                raise ValueError(
                    f"head dim dims[{i}]/heads[{i}] = {dim // heads} must be even (rotary pairs)"
                )
        if self.dims[0] % 2:
            raise ValueError(f"dims[0]={self.dims[0]} must be even (the stem halves it)")
        bad = [k for k in self.attention_kinds if k not in ATTENTION_KINDS]
        if bad:
            raise ValueError(
                f"PPMAConfig.attention_kinds entries must be 'X' or 'V', got {self.attention_kinds}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.stem_stride not in STEM_STRIDES:
            raise ValueError(f"stem_stride must be one of {STEM_STRIDES}, got {self.stem_stride}")
        if self.in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {self.in_chans}")

    @property
    def num_stages(self) -> int:
        return len(self.dims)

    @property
    def strides(self) -> tuple[int, ...]:
        """Downsampling of each stage's output relative to the input: stem_stride · 2^i."""
        return tuple(self.stem_stride * 2**i for i in range(self.num_stages))

    @property
    def head_dims(self) -> tuple[int, ...]:
        return tuple(d // h for d, h in zip(self.dims, self.heads, strict=True))

    def replace(self, **changes: object) -> PPMAConfig:
        """A copy with some fields changed; sequences are stored as tuples."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise TypeError(f"unknown PPMAConfig field(s) {unknown}; known: {sorted(fields)}")
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        items = dataclasses.asdict(self).items()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in items}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PPMAConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
