"""How an embedding store keeps its vectors on disk: float32, float16 or int8 (scalar-quantised).

Store rows are L2-normalised, so every component lies in [-1, 1].

  float32   4 bytes per component, exact.
  float16   2 bytes per component; each component is off by at most 2**-11 of its
            magnitude (half precision keeps 11 significant bits).
  int8      1 byte per component plus one float32 scale per row:
            q = round(x / s), s = max|x| / 127, x ~ q * s. Each component is off by at
            most s / 2, so a cosine with a unit query is off by at most
            ||x - q s||_2 <= sqrt(D) * s / 2.

Memory per item: D * {4, 2, 1} bytes (+ 4 for the int8 scale).
"""

from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float16", "int8")
INT8_LEVELS = 127.0


def bytes_per_item(dtype: str, dim: int) -> int:
    """Bytes one stored row takes on disk (and in memory when read whole)."""
    if dtype not in DTYPES:
        raise ValueError(f"store dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dim * {"float32": 4, "float16": 2, "int8": 1}[dtype] + (4 if dtype == "int8" else 0)


def encode_rows(rows: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """[N, D] float32 rows -> (stored [N, D] in `dtype`, int8 only: per-row scales [N] float32 else None)."""
    bytes_per_item(dtype, rows.shape[1])  # validates dtype
    if dtype == "float32":
        return np.ascontiguousarray(rows, np.float32), None
    if dtype == "float16":
        return rows.astype(np.float16), None
    peak = np.max(np.abs(rows), axis=1)
    scales = np.where(peak > 0, peak / INT8_LEVELS, 1.0).astype(np.float32)
    codes = np.clip(np.rint(rows / scales[:, None]), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return codes, scales


def decode_rows(stored: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """The inverse of `encode_rows`: [N, D] float32."""
    if scales is None:
        return np.asarray(stored, dtype=np.float32)
    return np.asarray(stored, dtype=np.float32) * np.asarray(scales, dtype=np.float32)[:, None]


class QuantizedShard:
    """An int8 shard that reads as float32: `shard[a:b]`, `shard[rows]`, `np.asarray(shard)` dequantise.

    codes: [n, D] int8 (memory-mapped is fine); scales: [n] float32. Only the rows asked
    for are dequantised, so a chunked scan holds one chunk in float32 at a time.
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, codes: np.ndarray, scales: np.ndarray):
        if codes.ndim != 2 or scales.shape != (codes.shape[0],):
            raise ValueError(f"int8 shard codes {codes.shape} and scales {scales.shape} do not match")
        self.codes, self.scales = codes, scales

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            raise TypeError("QuantizedShard takes row indices or a row slice, not a tuple")
        codes, scales = self.codes[key], self.scales[key]
        if codes.ndim == 1:
            return codes.astype(np.float32) * np.float32(scales)
        return decode_rows(codes, scales)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = decode_rows(self.codes, self.scales)
        return out if dtype is None else out.astype(dtype)
