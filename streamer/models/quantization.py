"""How a checkpoint's modules are quantized: config.json's ``quantization`` dict plus the stored shapes.

One resolution, as mlx-lm's loader does it, used by the model loader and by the checkpoint reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from streamer.errors import CheckpointError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


class Quant(NamedTuple):
    """How one module's weight is quantized."""

    bits: int
    group_size: int
    mode: str = "affine"


class QuantSpec:
    """Per-module quantization of a checkpoint, resolved as mlx-lm's loader resolves it.

    A module named in ``config["quantization"]`` uses that entry (``False`` = not quantized); any other
    module with stored ``.scales`` is quantized with parameters inferred from its tensor shapes; a
    module without ``.scales`` is not quantized.

    Args:
        quantization: config.json's ``quantization`` dict (defaults + overrides by module path), or None.
        shapes: stored tensor name -> shape, for every tensor of the checkpoint.
    """

    def __init__(self, quantization: Mapping | None, shapes: Mapping[str, tuple[int, ...]]):
        quantization = dict(quantization or {})
        self.default_group_size = int(quantization.pop("group_size", 64))
        self.default_bits = quantization.pop("bits", None)
        self.mode = quantization.pop("mode", "affine")
        self.overrides = {k: v for k, v in quantization.items() if isinstance(v, (dict, bool))}
        self.shapes = shapes

    @classmethod
    def from_config(cls, config: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> QuantSpec:
        quantization = config.get("quantization", config.get("quantization_config"))
        return cls(quantization, shapes)

    def quant_for(self, module_path: str, in_dims: int | None = None) -> Quant | None:
        """The quantization of ``module_path`` (e.g. "language_model.model.layers.0.mlp.gate"), or None.

        Args:
            module_path: the module's tensor-name prefix, without ``.weight``.
            in_dims: the module's unquantized input size, when the caller knows it. Shapes alone fix
                only bits * group_size; with ``in_dims`` the answer is exact, without it the
                default group size is preferred.

        Raises:
            CheckpointError: the stored shapes fit no supported bits / group size, or contradict the
                config entry.
        """
        entry = self.overrides.get(module_path)
        has_scales = f"{module_path}.scales" in self.shapes
        if entry is False or (entry is None and not has_scales):
            return None
        if not has_scales:
            raise CheckpointError(
                f"{module_path}: config.json quantization lists it as {entry} but the checkpoint has "
                f"no {module_path}.scales; the checkpoint and its config do not match"
            )
        if f"{module_path}.weight" not in self.shapes:
            raise CheckpointError(f"{module_path}: the checkpoint has .scales but no {module_path}.weight")
        packed = self.shapes[f"{module_path}.weight"][-1]  # in_dims * bits / 32 uint32 words
        groups = self.shapes[f"{module_path}.scales"][-1]  # in_dims / group_size
        if isinstance(entry, dict):
            quant = Quant(int(entry["bits"]), int(entry["group_size"]), entry.get("mode", self.mode))
        elif entry is True and self.default_bits is not None:
            quant = Quant(int(self.default_bits), self.default_group_size, self.mode)
        elif in_dims is not None:
            quant = Quant(packed * 32 // in_dims, in_dims // groups, self.mode)
        else:
            quant = self._infer(module_path, packed, groups)
        if (
            quant.bits not in SUPPORTED_BITS
            or packed * 32 != quant.bits * quant.group_size * groups
            or (in_dims is not None and in_dims != quant.group_size * groups)
        ):
            raise CheckpointError(
                f"{module_path}: stored weight [..., {packed}] and scales [..., {groups}] do not fit "
                f"{quant.bits}-bit quantization with group size {quant.group_size}"
                + (f" of {in_dims} inputs" if in_dims is not None else "")
            )
        return quant

    def _infer(self, module_path: str, packed: int, groups: int) -> Quant:
        # packed * 32 = bits * in_dims and in_dims = group_size * groups, so only
        # bits * group_size = packed * 32 / groups is known: try the default group size first.
        for group_size in dict.fromkeys([self.default_group_size, 64, 32, 128]):
            bits, rest = divmod(packed * 32, group_size * groups)
            if rest == 0 and bits in SUPPORTED_BITS:
                return Quant(bits, group_size, self.mode)
        raise CheckpointError(
            f"{module_path}: cannot infer quantization from weight [..., {packed}] and scales "
            f"[..., {groups}]; add an entry for it to config.json's quantization dict"
        )
