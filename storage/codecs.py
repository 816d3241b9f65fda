"""Stored dtypes and compression codecs: the one place that decides how hidden states become bytes.

Logical dtypes and their on-disk form:

========== ============ =====================================================================
logical    zarr dtype   decoding
========== ============ =====================================================================
float32    float32      as is
float16    float16      ``astype(float32)``
bfloat16   uint16       the upper 16 bits of a float32 (zarr 3.1 has no bfloat16 dtype)
int8       int8         ``q * scale[row]``, one float32 absmax scale per row (per token)
========== ============ =====================================================================

Every chunk ends in a crc32c checksum, so a flipped byte is detected on read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from storage.errors import ConfigError

STORED_DTYPES: dict[str, str] = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "uint16",
    "int8": "int8",
}
CODEC_NAMES = ("blosc-zstd", "blosc-lz4", "zstd", "none")


def parse_dtype(value: str) -> str:
    """Return the logical stored dtype named by ``value`` or raise :class:`ConfigError`."""
    key = value.strip().lower()
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
    key = aliases.get(key, key)
    if key not in STORED_DTYPES:
        raise ConfigError(
            f"unknown stored dtype {value!r}: expected one of {', '.join(STORED_DTYPES)} "
            "(flag --dtype)"
        )
    return key


def itemsize(dtype: str) -> int:
    """Bytes per stored element of a logical dtype."""
    return int(np.dtype(STORED_DTYPES[dtype]).itemsize)


@dataclass(frozen=True)
class CodecSpec:
    """Which compressor to use and how hard; shuffling is chosen per dtype."""

    name: str = "blosc-lz4"
    level: int = 5

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "level": self.level}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CodecSpec:
        return cls(name=str(data["name"]), level=int(data["level"]))


def parse_codec(value: str) -> CodecSpec:
    """Parse ``NAME`` or ``NAME:LEVEL`` (e.g. ``blosc-zstd:3``, ``zstd:5``, ``none``)."""
    name, _, level_text = value.strip().lower().partition(":")
    if name not in CODEC_NAMES:
        raise ConfigError(
            f"unknown codec {value!r}: expected one of {', '.join(CODEC_NAMES)}, optionally "
            "with ':LEVEL' (flag --codec)"
        )
    level = 3
    if level_text:
        if not level_text.isdigit() or not 0 <= int(level_text) <= 22:
            raise ConfigError(f"codec level in {value!r} must be an integer 0..22")
        level = int(level_text)
    return CodecSpec(name=name, level=level)


def compressors_for(spec: CodecSpec, zarr_dtype: str) -> list[Any]:
    """The zarr v3 bytes-to-bytes codecs for one array: a compressor, then a crc32c checksum."""
    size = int(np.dtype(zarr_dtype).itemsize)
    # bit-shuffle suits activations (near-random mantissas, structured exponents)
    shuffle: Literal["bitshuffle", "shuffle"] = "bitshuffle" if size <= 2 else "shuffle"
    codecs: list[Any] = []
    if spec.name == "blosc-zstd":
        codecs.append(BloscCodec(cname="zstd", clevel=spec.level, shuffle=shuffle, typesize=size))
    elif spec.name == "blosc-lz4":
        codecs.append(BloscCodec(cname="lz4", clevel=spec.level, shuffle=shuffle, typesize=size))
    elif spec.name == "zstd":
        codecs.append(ZstdCodec(level=spec.level))
    codecs.append(Crc32cCodec())
    return codecs


def decode_rows(stored: np.ndarray, dtype: str, scales: np.ndarray | None = None) -> np.ndarray:
    """Turn stored rows ``(n, d)`` back into float32 values."""
    if dtype == "float32":
        return np.asarray(stored, dtype=np.float32)
    if dtype == "float16":
        return stored.astype(np.float32)
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    if dtype == "int8":
        if scales is None:
            raise ConfigError("int8 rows need their per-row scales to decode")
        return stored.astype(np.float32) * scales.astype(np.float32)[:, None]
    raise ConfigError(f"unknown stored dtype {dtype!r}")


def encode_rows(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference encoder in numpy (stage one encodes with torch on the device; tests compare).

    bfloat16 rounds to nearest-even, like ``torch.Tensor.to(torch.bfloat16)``; int8 uses a
    per-row absmax scale ``max|x| / 127`` and round-half-even, like ``torch.round``.
    """
    x = np.asarray(values, dtype=np.float32)
    if dtype == "float32":
        return x.copy(), None
    if dtype == "float16":
        return x.astype(np.float16), None
    if dtype == "bfloat16":
        bits = x.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype(np.uint16), None
    if dtype == "int8":
        scale = (np.abs(x).max(axis=1) / np.float32(127.0)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1.0))
        q = np.clip(np.round(x / safe[:, None]), -127, 127).astype(np.int8)
        return q, scale
    raise ConfigError(f"unknown stored dtype {dtype!r}")
