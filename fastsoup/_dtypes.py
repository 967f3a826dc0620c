"""Element types: canonical names, safetensors codes, sizes and native kernel codes.

No torch here; ``fastsoup._torch`` maps these names to torch dtypes.
"""

from __future__ import annotations

from typing import NamedTuple

from ._errors import ArgumentError


class DTypeInfo(NamedTuple):
    name: str  # canonical name, as torch spells it without "torch."
    st: str  # safetensors header code
    itemsize: int
    code: int  # native kernel code (fastsoup/dtype.h), -1 for types the kernels do not read
    kind: str  # "float": averaged; "passthrough": copied from the first ingredient; "unsupported"
    bits: int = 0  # bits per element when not a whole number of bytes (4-bit, 6-bit floats); else 0

    def nbytes(self, numel: int) -> int | None:
        """Bytes of ``numel`` elements; None when they do not fill whole bytes (sub-byte types)."""
        if not self.bits:
            return numel * self.itemsize
        total = numel * self.bits
        return total // 8 if total % 8 == 0 else None


_TABLE = [
    DTypeInfo("float16", "F16", 2, 0, "float"),
    DTypeInfo("bfloat16", "BF16", 2, 1, "float"),
    DTypeInfo("float32", "F32", 4, 2, "float"),
    DTypeInfo("float64", "F64", 8, 3, "float"),
    DTypeInfo("int8", "I8", 1, -1, "passthrough"),
    DTypeInfo("int16", "I16", 2, -1, "passthrough"),
    DTypeInfo("int32", "I32", 4, -1, "passthrough"),
    DTypeInfo("int64", "I64", 8, -1, "passthrough"),
    DTypeInfo("uint8", "U8", 1, -1, "passthrough"),
    DTypeInfo("uint16", "U16", 2, -1, "passthrough"),
    DTypeInfo("uint32", "U32", 4, -1, "passthrough"),
    DTypeInfo("uint64", "U64", 8, -1, "passthrough"),
    DTypeInfo("bool", "BOOL", 1, -1, "passthrough"),
    # Known to safetensors (every dtype of safetensors 0.8), read and listed, but not averaged.
    DTypeInfo("float8_e4m3fn", "F8_E4M3", 1, -1, "unsupported"),
    DTypeInfo("float8_e5m2", "F8_E5M2", 1, -1, "unsupported"),
    DTypeInfo("float8_e8m0fnu", "F8_E8M0", 1, -1, "unsupported"),
    DTypeInfo("float8_e4m3fnuz", "F8_E4M3FNUZ", 1, -1, "unsupported"),
    DTypeInfo("float8_e5m2fnuz", "F8_E5M2FNUZ", 1, -1, "unsupported"),
    DTypeInfo("float4_e2m1fn", "F4", 0, -1, "unsupported", 4),  # no torch dtype (torch packs two: _x2)
    DTypeInfo("float6_e2m3fn", "F6_E2M3", 0, -1, "unsupported", 6),
    DTypeInfo("float6_e3m2fn", "F6_E3M2", 0, -1, "unsupported", 6),
    DTypeInfo("complex64", "C64", 8, -1, "unsupported"),
]

BY_NAME = {d.name: d for d in _TABLE}
BY_ST = {d.st: d for d in _TABLE}
BY_CODE = {d.code: d for d in _TABLE if d.code >= 0}
FLOAT_NAMES = tuple(d.name for d in _TABLE if d.kind == "float")

_ALIASES = {
    "fp16": "float16", "f16": "float16", "half": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "f32": "float32", "float": "float32", "float32": "float32",
    "fp64": "float64", "f64": "float64", "double": "float64", "float64": "float64",
}


def info(name: str) -> DTypeInfo:
    """The info of a canonical dtype name; names fastsoup does not know are "unsupported"."""
    found = BY_NAME.get(name)
    return found if found is not None else DTypeInfo(name, "?", 0, -1, "unsupported")


def parse_float_dtype(dtype: object) -> str:
    """A user's output dtype (``"fp16"``, ``"bfloat16"``, ``torch.float32`` ...) -> canonical name."""
    text = str(dtype).lower()
    if text.startswith("torch."):
        text = text[len("torch."):]
    try:
        return _ALIASES[text]
    except KeyError:
        raise ArgumentError(
            f"unsupported output dtype {dtype!r}: use one of fp16, bf16, fp32 (or float16, bfloat16, float32, float64)"
        ) from None
