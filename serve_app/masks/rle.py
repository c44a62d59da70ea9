"""Label Studio brush RLE, vectorised with numpy.

The format (label_studio_sdk.converter.brush): a 32-bit count of RGBA bytes, a 5-bit word size
minus one, four 4-bit run-length-field sizes minus one, then one record per run. Masks are
written as RGBA with every channel equal, so every run is at least 4 long and is a "series"
record: bit 1, a 2-bit index into the field sizes, the run length minus one, the 8-bit value.
The sdk's encoder builds that bit string in Python; this one builds the same bytes with numpy,
which matters for 12-megapixel masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_WORD_BITS = 8
_FIELD_BITS = np.array([3, 4, 8, 16])
_MAX_RUN = 2 ** 16  # longest run one record holds


def _header_bits(count: int) -> str:
    return f"{count:032b}" + f"{_WORD_BITS - 1:05b}" + "".join(f"{b - 1:04b}" for b in _FIELD_BITS)


def mask_to_rle(mask: np.ndarray) -> np.ndarray:
    """Encode a 2-D mask (bool or 0/255) as Label Studio brush RLE bytes (a uint8 array; `.tolist()` gives
    the sdk's list of ints). The service's orjson writes the array as that JSON list without building
    millions of Python ints."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    flat = np.ascontiguousarray(mask).reshape(-1)
    values = flat.view(np.uint8) * np.uint8(255) if mask.dtype == bool else flat.astype(np.uint8, copy=False)
    header = np.frombuffer(_header_bits(values.size * 4).encode(), np.uint8) - ord("0")
    if values.size == 0:
        return np.packbits(header)

    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate(([0], change))
    return _encode_runs(header, starts, values[starts].astype(np.int64), values.size)


@dataclass(frozen=True)
class MaskRuns:
    """A binary mask as where its runs start, row-major: all RLE needs, and a few KB where the pixels are 100s of
    KB, so a GPU replica finds them on the GPU and copies only these (serve_app.models.device_masks)."""
    changes: np.ndarray  # flat indices where the value flips, ascending (a run starts at 0 and at each)
    first: bool  # the value of pixel 0
    size: int  # pixels in the mask


def runs_to_rle(runs: MaskRuns) -> np.ndarray:
    """The same bytes as `mask_to_rle` of the mask `runs` describes."""
    header = np.frombuffer(_header_bits(runs.size * 4).encode(), np.uint8) - ord("0")
    if runs.size == 0:
        return np.packbits(header)
    starts = np.concatenate(([0], np.asarray(runs.changes, np.int64)))
    on = (np.arange(starts.size) % 2 == 0) == bool(runs.first)
    return _encode_runs(header, starts, np.where(on, 255, 0).astype(np.int64), runs.size)


def _encode_runs(header: np.ndarray, starts: np.ndarray, run_values: np.ndarray, size: int) -> np.ndarray:
    """Records for runs starting at `starts` (ascending, the first 0) with those 8-bit values, in a mask of `size`
    pixels, after the header bits."""
    lengths = np.diff(np.concatenate((starts, [size]))).astype(np.int64) * 4  # RGBA
    # A run longer than one record holds is written as full records plus a remainder.
    full = (lengths - 1) // _MAX_RUN
    if full.any():
        pieces = full + 1
        run_values = np.repeat(run_values, pieces)
        last = np.cumsum(pieces) - 1
        lengths_split = np.full(int(pieces.sum()), _MAX_RUN, np.int64)
        lengths_split[last] = lengths - full * _MAX_RUN
        lengths = lengths_split

    size_index = np.searchsorted(2 ** _FIELD_BITS, lengths)  # smallest field that holds length - 1
    field_bits = _FIELD_BITS[size_index]
    record_bits = 1 + 2 + field_bits + _WORD_BITS  # 14 to 27 bits
    codes = (((1 << 2 | size_index) << field_bits | (lengths - 1)) << _WORD_BITS) | run_values

    # Write every record straight into the output bytes: a record starts at bit `start` and spans at most
    # 5 bytes, placed MSB-first in a 40-bit window. Records are at least 14 bits long, so records i and i+2
    # never share a byte; OR-ing even and odd records in two passes never writes one byte twice at once.
    total_bits = header.size + int(record_bits.sum())
    out = np.zeros(total_bits // 8 + 1 + 5, np.uint8)  # the sdk always appends 1 to 8 zero bits
    head = np.packbits(header)
    out[:head.size] = head
    starts_bits = header.size + np.cumsum(record_bits) - record_bits
    first_byte = starts_bits >> 3
    window = codes.astype(np.uint64) << (40 - (starts_bits & 7) - record_bits).astype(np.uint64)
    for parity in (0, 1):
        rows, words = first_byte[parity::2], window[parity::2]
        for k in range(5):
            out[rows + k] |= ((words >> np.uint64(32 - 8 * k)) & np.uint64(0xFF)).astype(np.uint8)
    return out[:total_bits // 8 + 1]
