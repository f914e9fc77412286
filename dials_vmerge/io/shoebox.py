"""The `Shoebox<>` column: one variable-length record per row, kept as raw bytes.

Record layout (dials-formats.md 1.8): uint32 panel, int32 bbox[6], uint8 marker, then if the
marker is 1 or 2: float32 data[npx], mask[npx] (int32 for marker 1, uint8 for marker 2),
float32 background[npx], with npx = (z1-z0)(y1-y0)(x1-x0). We keep the bytes untouched so a
table writes back byte for byte; pixel arrays are decoded on demand.
"""

from __future__ import annotations

import numpy as np
from numba import njit

HEADER_BYTES = 29


@njit(cache=True)
def _record_offsets(blob, n_records):
    """Start offset of each record (and the end), or -1 in offsets[0] if the blob is malformed."""
    offsets = np.empty(n_records + 1, dtype=np.int64)
    pos = 0
    size = blob.shape[0]
    for i in range(n_records):
        offsets[i] = pos
        if pos + HEADER_BYTES > size:
            offsets[0] = -1
            return offsets
        bbox = np.empty(6, dtype=np.int64)
        for j in range(6):
            b = pos + 4 + 4 * j
            bbox[j] = np.int64(
                np.uint32(blob[b])
                | (np.uint32(blob[b + 1]) << 8)
                | (np.uint32(blob[b + 2]) << 16)
                | (np.uint32(blob[b + 3]) << 24)
            )
        marker = blob[pos + 28]
        pos += HEADER_BYTES
        if marker != 0:
            if marker > 2:
                offsets[0] = -1
                return offsets
            nx = bbox[1] - bbox[0]
            ny = bbox[3] - bbox[2]
            nz = bbox[5] - bbox[4]
            if nx < 0 or ny < 0 or nz < 0:
                offsets[0] = -1
                return offsets
            npx = nx * ny * nz
            mask_bytes = 4 if marker == 1 else 1
            pos += npx * (8 + mask_bytes)
            if pos > size:
                offsets[0] = -1
                return offsets
    offsets[n_records] = pos
    return offsets


@njit(cache=True)
def _gather(blob, offsets, index):
    total = 0
    for i in range(index.shape[0]):
        total += offsets[index[i] + 1] - offsets[index[i]]
    out = np.empty(total, dtype=np.uint8)
    new_offsets = np.empty(index.shape[0] + 1, dtype=np.int64)
    pos = 0
    for i in range(index.shape[0]):
        start = offsets[index[i]]
        n = offsets[index[i] + 1] - start
        new_offsets[i] = pos
        out[pos : pos + n] = blob[start : start + n]
        pos += n
    new_offsets[index.shape[0]] = pos
    return out, new_offsets


class ShoeboxFormatError(ValueError):
    pass


class Shoeboxes:
    """Raw shoebox records with offsets; behaves like a column for select/concatenate."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob = blob
        self.offsets = offsets

    @classmethod
    def from_bytes(cls, data: bytes, n_records: int) -> "Shoeboxes":
        blob = np.frombuffer(data, dtype=np.uint8)
        offsets = _record_offsets(blob, n_records)
        if n_records and offsets[0] < 0:
            raise ShoeboxFormatError("shoebox records are truncated or malformed")
        if offsets[n_records] != blob.shape[0]:
            raise ShoeboxFormatError(
                f"shoebox blob has {blob.shape[0] - offsets[n_records]} bytes after the last record"
            )
        return cls(blob, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def to_bytes(self) -> bytes:
        """The records for a version-1 file (int32 masks)."""
        if self.has_uint8_masks():
            return self._with_int32_masks().tobytes()
        return self.blob.tobytes()

    def select(self, index) -> "Shoeboxes":
        blob, offsets = _gather(self.blob, self.offsets, np.asarray(index, dtype=np.int64))
        return Shoeboxes(blob, offsets)

    @staticmethod
    def concatenate(columns) -> "Shoeboxes":
        blobs, offsets, shift = [], [np.zeros(1, dtype=np.int64)], 0
        for c in columns:
            blobs.append(c.blob)
            offsets.append(c.offsets[1:] + shift)
            shift += c.blob.shape[0]
        return Shoeboxes(np.concatenate(blobs), np.concatenate(offsets))

    def _headers(self):
        starts = self.offsets[:-1]
        idx = starts[:, None] + np.arange(HEADER_BYTES)[None, :]
        return self.blob[idx] if len(starts) else np.zeros((0, HEADER_BYTES), np.uint8)

    @property
    def panel(self) -> np.ndarray:
        return np.ascontiguousarray(self._headers()[:, 0:4]).view("<u4").ravel()

    @property
    def bbox(self) -> np.ndarray:
        return np.ascontiguousarray(self._headers()[:, 4:28]).view("<i4").reshape(-1, 6)

    @property
    def marker(self) -> np.ndarray:
        return self._headers()[:, 28].copy()

    def has_uint8_masks(self) -> bool:
        return bool(np.any(self.marker == 2))

    def pixels(self, row: int):
        """(data, mask, background) arrays of shape (nz, ny, nx), or None if the row has none."""
        start = self.offsets[row]
        header = self.blob[start : start + HEADER_BYTES]
        marker = int(header[28])
        if marker == 0:
            return None
        x0, x1, y0, y1, z0, z1 = np.frombuffer(header[4:28].tobytes(), "<i4")
        shape = (z1 - z0, y1 - y0, x1 - x0)
        npx = int(np.prod(shape))
        pos = start + HEADER_BYTES
        data = np.frombuffer(self.blob[pos : pos + 4 * npx].tobytes(), "<f4").reshape(shape)
        pos += 4 * npx
        mask_dtype, mask_bytes = ("<i4", 4) if marker == 1 else ("u1", 1)
        mask = np.frombuffer(self.blob[pos : pos + mask_bytes * npx].tobytes(), mask_dtype)
        pos += mask_bytes * npx
        background = np.frombuffer(self.blob[pos : pos + 4 * npx].tobytes(), "<f4")
        return data, mask.reshape(shape).astype(np.int32), background.reshape(shape)

    def _with_int32_masks(self) -> np.ndarray:
        # Rare path (version-2 input written as version 1): rebuild record by record.
        parts = []
        for row in range(len(self)):
            start, end = self.offsets[row], self.offsets[row + 1]
            header = self.blob[start : start + HEADER_BYTES].copy()
            if header[28] != 2:
                parts.append(self.blob[start:end])
                continue
            data, mask, background = self.pixels(row)
            header[28] = 1
            parts.extend(
                [
                    header,
                    np.frombuffer(data.astype("<f4").tobytes(), np.uint8),
                    np.frombuffer(mask.astype("<i4").tobytes(), np.uint8),
                    np.frombuffer(background.astype("<f4").tobytes(), np.uint8),
                ]
            )
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)
