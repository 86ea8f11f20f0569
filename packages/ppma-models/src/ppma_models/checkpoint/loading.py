"""Loading a checkpoint's tensors into a model that is already built.

The authors' key layout is converted (:mod:`ppma_models.convert`). Tensor dtypes are held to
the model's: a tensor must be of the same kind (floating point, integer, bool, complex);
integer data in a float parameter is refused, since casting it would load a silently wrong
model. Another floating-point precision (float16, bfloat16, float64, ...) is converted to the
model's and reported: a :class:`CheckpointWarning` per source dtype names the file, the dtype,
the number of tensors and whether the values survived exactly, and
:attr:`LoadResult.converted` lists the tensors.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..convert import AngleMismatchError, convert_from_upstream, is_upstream_state_dict
from ..model import PPMA
from ..segmentation import SegmentationModel
from .errors import CheckpointError, CheckpointWarning
from .reading import LoadResult, read_checkpoint

WEIGHT_CHOICES = ("auto", "model_ema", "model")

# The first convolution of the stem: the only weight whose shape depends on in_chans.
INPUT_CONV = "stem.conv1.weight"


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A stem kernel (out, c, kh, kw) for ``in_chans`` input channels instead of c.

    From one channel (a greyscale model, e.g. Fashion-MNIST) to several, the kernel is shared
    by every channel and divided by their number, so a grey image given as identical channels
    yields the pretrained response. Other conversions are refused: which channel means what
    is not known.
    """
    if weight.ndim != 4:
        raise CheckpointError(
            f"stem kernel must be 4-D (out, in, kh, kw), got {tuple(weight.shape)}"
        )
    if weight.shape[1] == in_chans:
        return weight
    if weight.shape[1] != 1:
        raise CheckpointError(
            f"cannot adapt a stem kernel with {weight.shape[1]} input channels to {in_chans}; "
            "only one-channel (greyscale) kernels are spread over several channels"
        )
    return weight.expand(-1, in_chans, -1, -1) / in_chans


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def check_dtypes(
    state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], result: LoadResult
) -> None:
    """Refuse tensors of another kind than the model's; warn about float precision changes.

    ``load_state_dict`` would cast integer data into a float parameter without a word, and
    the model would run with wrong weights; no genuine checkpoint stores weights that way.
    A float tensor of another precision is cast too, but that is a property of the file
    (half-precision exports) rather than damage, so it is loaded and reported.
    """
    common = [k for k in state if k in own]
    wrong = [
        f"{k} ({state[k].dtype}, model {own[k].dtype})"
        for k in common
        if _dtype_kind(state[k].dtype) != _dtype_kind(own[k].dtype)
    ]
    if wrong:
        raise CheckpointError(
            f"{result.path}: {len(wrong)} tensor(s) hold data of another kind than the model's "
            "(integer or bool data where the model has floating-point weights, or the "
            "reverse); the file is damaged or not a PPMA checkpoint: " + ", ".join(wrong[:8])
        )
    cast = sorted(
        k for k in common if state[k].is_floating_point() and state[k].dtype != own[k].dtype
    )
    result.converted += cast
    for (src, dst), n in sorted(
        Counter((state[k].dtype, own[k].dtype) for k in cast).items(), key=str
    ):
        exact = torch.promote_types(src, dst) == dst
        warnings.warn(
            f"{result.path}: {n} tensor(s) stored as {src} were converted to the model's {dst} "
            f"({'exactly' if exact else 'with rounding'})",
            CheckpointWarning,
            stacklevel=4,  # the caller of load_checkpoint
        )


def _check_fit(
    what: str,
    state: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    result: LoadResult,
    strict: bool,
) -> None:
    """Raise unless every file tensor fits its model tensor (and, if strict, keys match);
    ``what`` names the model in the messages."""
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"{result.path}: {len(mismatched)} tensor shape(s) do not fit the model "
            f"{what}: " + "; ".join(mismatched[:8])
        )
    result.missing = sorted(set(own) - set(state) - set(result.kept_init))
    result.unexpected = sorted(set(state) - set(own))
    if strict and (result.missing or result.unexpected):
        raise CheckpointError(
            f"{result.path} does not match the model {what}: "
            f"{len(result.missing)} missing key(s) {result.missing[:8]}, "
            f"{len(result.unexpected)} unexpected key(s) {result.unexpected[:8]} "
            "(pass strict=False to load the matching part)"
        )
    check_dtypes(state, own, result)


def _fit_to_ppma(
    model: PPMA,
    state: dict[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    result: LoadResult,
    reset_mismatched_classifier: bool,
) -> dict[str, torch.Tensor]:
    """The file's tensors (our key names) with the deliberate differences to ``model`` applied:
    a features model drops the classifier and foreign per-stage norms, a classifier may keep
    its fresh final layer, a one-channel stem kernel is spread over the model's channels."""
    if model.features_only:
        head = sorted(k for k in state if k.startswith("head."))
        result.dropped += head
        extra_norms = sorted(k for k in state if k.startswith("out_norms.") and k not in own)
        result.dropped += extra_norms
        state = {k: v for k, v in state.items() if k not in set(head) | set(extra_norms)}
        if not any(k.startswith("out_norms.") for k in state):
            result.kept_init += sorted(k for k in own if k.startswith("out_norms."))
    fc_keys = ("head.fc.weight", "head.fc.bias")
    if reset_mismatched_classifier and not model.features_only:
        fc = state.get("head.fc.weight")
        if fc is not None and (
            "head.fc.weight" not in own or fc.shape != own["head.fc.weight"].shape
        ):
            result.dropped += [k for k in fc_keys if k in state]
            result.kept_init += [k for k in fc_keys if k in own]
            state = {k: v for k, v in state.items() if k not in fc_keys}

    stem, own_stem = state.get(INPUT_CONV), own.get(INPUT_CONV)
    # Only a 4-D kernel is a candidate; anything else is reported by the shape check.
    if stem is not None and own_stem is not None and stem.ndim == own_stem.ndim == 4:
        if stem.shape[1] != own_stem.shape[1] and _dtype_kind(stem.dtype) == "floating-point":
            state = {**state, INPUT_CONV: adapt_input_channels(stem, own_stem.shape[1])}
            result.adapted.append(INPUT_CONV)
    return state


def _read_for_ppma(
    model: PPMA, path: str | Path, weights: str, allowed_globals: Sequence[type]
) -> tuple[dict[str, torch.Tensor], LoadResult]:
    """The file's tensors in our key names, the entry picked by ``weights``."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    if weights == "auto":
        weights = "model" if model.features_only else "model_ema"
    state, result = read_checkpoint(path, weights=weights, allowed_globals=allowed_globals)
    if is_upstream_state_dict(state):
        try:
            state = convert_from_upstream(state, model.config)
        except AngleMismatchError as exc:
            raise CheckpointError(f"{result.path} does not fit the model: {exc}") from exc
    return state, result


def _read_whole_model(
    model: torch.nn.Module, path: str | Path, allowed_globals: Sequence[type]
) -> tuple[dict[str, torch.Tensor], LoadResult]:
    """A segmentation model's or detector's whole state, from our safetensors files only."""
    state, result = read_checkpoint(path, allowed_globals=allowed_globals)
    if result.kind != "safetensors":
        other = (
            "load_checkpoint(model.backbone, path)"
            if isinstance(model, SegmentationModel)
            else "ppma_models.detection_convert.load_detection_checkpoint(model, path)"
        )
        raise CheckpointError(
            f"{result.path}: a {type(model).__name__} loads ppma_models safetensors files "
            f"here; for this file use {other}"
        )
    return state, result


def load_checkpoint(
    model: torch.nn.Module,
    path: str | Path,
    *,
    strict: bool = True,
    weights: str = "auto",
    reset_mismatched_classifier: bool = False,
    allowed_globals: Sequence[type] = (),
) -> LoadResult:
    """Load an authors' checkpoint or one of our safetensors files into ``model``.

    weights: "auto" picks ``model_ema`` for classifiers and ``model`` for features models
    (as the authors' dense training does), or name the entry explicitly.
    Upstream key names are converted (see :mod:`ppma_models.convert`). Rules:

    * a features model loading a classification file drops the classifier head and keeps
      its freshly initialised per-stage LayerNorms (the authors' pretrain → dense path);
    * per-stage LayerNorms for stages outside ``model.out_indices`` are dropped;
    * with ``reset_mismatched_classifier`` a head with another number of classes is dropped
      and the model's fresh final layer is kept (fine-tuning);
    * any other missing or unexpected key raises :class:`CheckpointError` unless
      ``strict=False``; a shape mismatch always raises, except a one-channel stem kernel
      loaded into a model with more input channels (:func:`adapt_input_channels`);
    * integer or bool data for a float tensor raises; float data of another precision is
      converted with a :class:`CheckpointWarning` (see the module docstring).

    A :class:`SegmentationModel` or a detector
    (:class:`~ppma_models.detection.PPMAMaskRCNN`) loads our safetensors files only (its
    whole state); ``weights`` and ``reset_mismatched_classifier`` then do not apply.
    """
    own = model.state_dict()
    if not isinstance(model, PPMA):
        state, result = _read_whole_model(model, path, allowed_globals)
        name = getattr(model, "name", None) or getattr(model.backbone, "name", None) or ""
        what = f"{type(model).__name__}({name})"
    else:
        state, result = _read_for_ppma(model, path, weights, allowed_globals)
        state = _fit_to_ppma(model, state, own, result, reset_mismatched_classifier)
        what = model.name or ""
    _check_fit(what, state, own, result, strict)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return result
