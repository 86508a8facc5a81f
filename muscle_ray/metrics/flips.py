"""Flip metrics between two result sets of one task (MUSCLE, arXiv 2407.09435, §2).

Everything is computed on the inner join of the two sets by `id`; ids on one side only are
counted (`only_old`, `only_new`) and reported with examples, never dropped silently.

Discrete (per-instance `correct`, e.g. multiple choice or exact match), over N joined rows:
  acc_old, acc_new; NFR = mean(old right & new wrong); PFR = mean(old wrong & new right);
  NFR_mc = mean(new wrong & new prediction != old prediction) (inconsistency flips);
  five quadrants: both_right, positive_flip, both_wrong_same, both_wrong_different,
  negative_flip; BTC = both_right / old-correct (backward trust compatibility: the share of
  the old model's right answers the new one keeps); BEC = both wrong / new-wrong (backward
  error compatibility, Srivastava et al. 2020: the share of the new model's errors that the
  old model also made, i.e. errors users already knew about).
Continuous (any per-instance score S): D = S(new) - S(old); PFR = mean(D > eps), NFR =
  mean(D < -eps) (eps = 0: any change counts, the paper's rule); m_g = mean D over improved,
  m_r = mean |D| over regressed. With S = correctness these equal the discrete PFR and NFR.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from muscle_ray.metrics import stats


class Quadrant(enum.IntEnum):
    """Where one instance lands in an update; the value is its code in flip tables."""

    BOTH_RIGHT = 0
    POSITIVE_FLIP = 1
    BOTH_WRONG_SAME = 2
    BOTH_WRONG_DIFFERENT = 3
    NEGATIVE_FLIP = 4


QUADRANTS = tuple(q.name.lower() for q in Quadrant)
DIRECTIONS = ("improved", "tie", "regressed")
EXAMPLES = 5


@dataclass
class Paired:
    """Two result sets aligned on their shared ids, as row numbers into each source.

    Columns are gathered on demand (`old_column`, `new_column`, optionally for a subset of
    the pairs), so a summary never pays for copying the wide string columns it does not
    need. Pairs are in OLD's row order.
    """

    old_source: pa.Table
    new_source: pa.Table
    old_rows: np.ndarray
    new_rows: np.ndarray
    only_old: int
    only_new: int
    only_old_examples: list[str] = field(default_factory=list)
    only_new_examples: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.old_rows)

    def old_column(self, name: str, where: np.ndarray | None = None) -> pa.ChunkedArray:
        return _take(self.old_source, name, self.old_rows, where)

    def new_column(self, name: str, where: np.ndarray | None = None) -> pa.ChunkedArray:
        return _take(self.new_source, name, self.new_rows, where)

    def old_numpy(self, name: str) -> np.ndarray:
        """A bool or numeric column of OLD's paired rows (nulls as False / 0)."""
        return as_numpy(self.old_source.column(name))[self.old_rows]

    def new_numpy(self, name: str) -> np.ndarray:
        return as_numpy(self.new_source.column(name))[self.new_rows]


def _take(table: pa.Table, name: str, rows: np.ndarray, where: np.ndarray | None) -> pa.ChunkedArray:
    return table.column(name).take(as_arrow(rows if where is None else rows[where]))


# --- numpy <-> Arrow without pandas -----------------------------------------------------
# pyarrow's `pa.array(ndarray)` and `to_numpy` import pandas (to check for a Series, to set
# up its converters): 0.3-0.5 s of CPU in a command that needs none of it.


def as_arrow(values: np.ndarray) -> pa.Array:
    """A 1-D integer or float numpy array as an Arrow array over the same memory."""
    values = np.ascontiguousarray(values)
    if values.dtype.kind not in "iuf":
        raise TypeError(f"as_arrow takes integers or floats, not {values.dtype}")
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def as_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A bool, integer or float column as one numpy array read from its Arrow buffers, nulls
    as False / 0 (callers check nulls first); other types through Arrow's own conversion."""
    typ = column.type
    if pa.types.is_boolean(typ):
        dtype = np.dtype(bool)
    elif pa.types.is_integer(typ) or pa.types.is_floating(typ):
        dtype = np.dtype(typ.to_pandas_dtype())
    else:
        return column.to_numpy(zero_copy_only=False)
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [_chunk_numpy(c, dtype) for c in chunks if len(c)]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty(0, dtype)


def _chunk_numpy(chunk: pa.Array, dtype: np.dtype) -> np.ndarray:
    n, offset = len(chunk), chunk.offset
    validity, data = chunk.buffers()[:2]
    if dtype.kind == "b":
        values = _bits(data, offset, n)
    else:
        values = np.frombuffer(data, dtype, n, offset * dtype.itemsize)
    if chunk.null_count:
        values = np.where(_bits(validity, offset, n), values, dtype.type(0))
    return values


def _bits(buffer: pa.Buffer, offset: int, n: int) -> np.ndarray:
    """Bits offset .. offset + n of an Arrow bitmap (least significant bit first) as bools."""
    packed = np.frombuffer(buffer, np.uint8, (offset + n + 7) // 8)
    return np.unpackbits(packed, count=offset + n, bitorder="little")[offset:].view(bool)


def pair(old: pa.Table, new: pa.Table, names: tuple[str, str] = ("OLD", "NEW")) -> Paired:
    """Inner-join by id; also checks that ids are unique on each side.

    The join runs on integers, not strings (`_join`). Two scorings of one input usually list
    the same ids in the same order; that is checked first (one sequential comparison), and
    then only OLD's ids need the uniqueness check. Pairs come in OLD's row order, which makes
    the flip table deterministic; columns are gathered later, only those a caller needs.
    """
    ids_old, ids_new = _Ids(old, names[0]), _Ids(new, names[1])
    if ids_old.same_as(ids_new):
        _join(ids_old, _Ids(new.slice(0, 0), names[1]))  # raises on a duplicate id
        rows = np.arange(old.num_rows)
        rows.flags.writeable = False  # one array for both sides
        return Paired(old, new, rows, rows, 0, 0)
    io, inew = _join(ids_old, ids_new)
    return Paired(
        old_source=old,
        new_source=new,
        old_rows=io,
        new_rows=inew,
        only_old=old.num_rows - len(io),
        only_new=new.num_rows - len(inew),
        only_old_examples=_unmatched(old, io),
        only_new_examples=_unmatched(new, inew),
    )


def _join(ids_old: _Ids, ids_new: _Ids) -> tuple[np.ndarray, np.ndarray]:
    """(OLD rows, NEW rows) of the pairs, in OLD's row order; MuscleError on a duplicate id
    (OLD's first).

    Each id gets a 64-bit hash of its bytes (`_Ids.fingerprints`, numpy over the value
    buffer: no Python objects); the hashes of both sides, each with its row number packed
    into the low bits, are sorted together (one numpy sort), so equal ids end up next to
    each other. A group of exactly one OLD and one NEW row is a pair once the two id strings
    are confirmed equal (a hash may collide); any other group of rows sharing a hash (a
    duplicate id, or a collision) is resolved exactly by hashing just those strings.
    """
    n_old, n = ids_old.n, ids_old.n + ids_new.n
    bits = max(n - 1, 1).bit_length()  # row numbers take the low `bits` bits of each key
    if 2 * bits > 64:  # a pair packs two row numbers into 64 bits
        from muscle_ray.errors import MuscleError

        raise MuscleError(f"{ids_old.name} and {ids_new.name}: {n} rows, the join takes up to 2^32")
    low = np.uint64((1 << bits) - 1)
    keys = np.empty(n, dtype=np.uint64)
    ids_old.fingerprints(keys[:n_old])
    ids_new.fingerprints(keys[n_old:])
    # Row numbers as uint32 (n <= 2^32): on this scale every fresh temporary costs page faults.
    rows = np.arange(n, dtype=np.uint32)
    keys &= ~low
    keys |= rows
    keys.sort()
    np.bitwise_and(keys, low, out=rows, casting="unsafe")  # row numbers in hash order
    keys >>= np.uint64(bits)
    tied = keys[1:] == keys[:-1]  # tied[i]: sorted rows i and i + 1 share a hash
    del keys
    two = tied.copy()  # sorted rows i, i + 1 form a group of exactly two
    two[1:] &= ~tied[:-1]
    two[:-1] &= ~tied[1:]
    at = np.flatnonzero(two)
    a, b = rows[at], rows[at + 1]  # a < b: in a tie the row numbers decide the order
    cross = (a < n_old) & (b >= n_old)
    # Rows tied with more than one row, or with a row of their own side: duplicates or collisions
    # (none when every tie is one of the OLD-NEW twosomes).
    hard = np.empty(0, dtype=np.int64)
    if np.count_nonzero(tied) > np.count_nonzero(cross):
        tied &= ~two  # ties within groups of three or more
        tied[at[~cross]] = True  # twosomes of one side
        at = np.flatnonzero(tied)
        hard = np.unique(np.concatenate([rows[at], rows[at + 1]])).astype(np.int64)
    del rows, tied, two, at  # before the string comparison, the join's peak of memory
    # Into OLD's row order by sorting (old row, new row) packed in one integer: sequential,
    # where scattering into an array indexed by old row is a TLB miss per pair.
    pairs = a[cross].astype(np.uint64)
    pairs <<= np.uint64(bits)
    pairs |= b[cross]
    del a, b
    pairs.sort()
    inew = np.bitwise_and(pairs, low).view(np.int64)
    inew -= n_old
    pairs >>= np.uint64(bits)
    io = pairs.view(np.int64)
    # Confirm each candidate pair on the id strings.
    same = ids_old.equal(io, ids_new, inew)
    if same.all() and not len(hard):
        return io, inew
    # A twosome whose strings differ is two unmatched ids (they share a hash with nothing else);
    # the rows of bigger groups pair up by their strings and merge in, in OLD's order.
    io, inew = io[same], inew[same]
    more_old, more_new = _join_exactly(ids_old, hard[hard < n_old], ids_new, hard[hard >= n_old] - n_old)
    if len(more_old):
        at = np.searchsorted(io, more_old)
        io, inew = np.insert(io, at, more_old), np.insert(inew, at, more_new)
    return io, inew


def _join_exactly(
    ids_old: _Ids, rows_old: np.ndarray, ids_new: _Ids, rows_new: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The duplicate check and the join on a few rows (ascending) by the strings themselves:
    (OLD rows, NEW rows) of the pairs among them, in OLD's order."""
    encoded = pc.dictionary_encode(pa.concat_arrays([ids_old.values(rows_old), ids_new.values(rows_new)]))
    codes, k = as_numpy(encoded.indices), len(encoded.dictionary)
    code_old, code_new = codes[: len(rows_old)], codes[len(rows_old) :]
    ids_old.check_unique(rows_old, code_old, k)
    ids_new.check_unique(rows_new, code_new, k)
    row_of_code = np.full(k, -1, dtype=np.int64)
    row_of_code[code_new] = rows_new
    hit = row_of_code[code_old]
    return rows_old[hit >= 0], hit[hit >= 0]


class _Ids:
    """A table's id column, hashed and compared straight from its Arrow buffers.

    A value of c = ceil(len / 8) eight-byte words is read as its first c - 1 aligned words
    and then the 8 bytes that end it (overlapping), as little-endian integers through a
    strided view of its chunk's value buffer: no copy, no Python objects, and no read past
    the buffer. Hashing goes in blocks of `BLOCK` rows, so temporaries stay in cache.
    """

    BLOCK = 1 << 13  # rows: 64 KiB temporaries, below glibc's mmap threshold, so reused without page faults

    def __init__(self, table: pa.Table, name: str):
        from muscle_ray.errors import MuscleError

        self.name, self.column = name, table.column("id")
        if self.column.null_count:
            row = int(np.flatnonzero(as_numpy(pc.is_null(self.column)))[0])
            raise MuscleError(f"{name}: column 'id' is null at row {row}")
        chunks = [c if pa.types.is_string(c.type) else c.cast(pa.large_string()) for c in self.column.chunks]
        self.chunks = pa.chunked_array(chunks, chunks[0].type if chunks else pa.string())
        self.n = len(self.chunks)

    @functools.cached_property
    def strings(self) -> pa.Array:
        """The ids as one array, for taking rows at random (Arrow's take on a chunked string
        column concatenates the chunks on every call); large_string past 2 GiB of text."""
        try:
            return self.chunks.combine_chunks()
        except pa.ArrowInvalid:  # string offsets overflow
            return self.chunks.cast(pa.large_string()).combine_chunks()

    def same_as(self, other: _Ids) -> bool:
        """The same ids in the same order (checked on a sample first, so a mismatch is cheap)."""
        if self.n != other.n or self.chunks[:1000] != other.chunks[:1000]:
            return False
        return not self.n or bool(pc.all(pc.equal(*_same_type(self.chunks, other.chunks))).as_py())

    def values(self, rows: np.ndarray) -> pa.Array:
        """The values at `rows` (ascending), taken chunk by chunk: `strings` would copy them all."""
        bounds = np.cumsum([0] + [len(c) for c in self.chunks.chunks])
        chunk_of = np.searchsorted(bounds, rows, side="right") - 1
        parts = [
            self.chunks.chunk(int(i)).take(as_arrow(rows[chunk_of == i] - bounds[i])).cast(pa.large_string())
            for i in np.unique(chunk_of)
        ]
        return pa.concat_arrays(parts) if parts else pa.nulls(0, pa.large_string())

    def fingerprints(self, out: np.ndarray) -> None:
        """A 64-bit hash of each value's length and bytes, written into `out`."""
        row = 0
        for chunk in filter(len, self.chunks.chunks):
            words, offsets = _word_view(chunk), _offsets(chunk)
            for start in range(0, len(chunk), self.BLOCK):
                o = offsets[start : start + self.BLOCK + 1]
                _hash_block(words, o[:-1], o[1:], out[row : row + len(o) - 1])
                row += len(o) - 1

    def equal(self, rows: np.ndarray, other: _Ids, other_rows: np.ndarray) -> np.ndarray:
        """Whether value `rows[i]` here equals value `other_rows[i]` there, byte for byte.

        `rows` ascending. When they cover most rows here, only the other side's values are
        taken (in this side's order) and compared with zero-copy slices of this side, which
        halves the copying; a row without a partner compares against the other's first value.
        """
        block = 1 << 20
        if len(rows) * 2 < self.n:
            same = np.empty(len(rows), dtype=bool)
            for start in range(0, len(rows), block):
                part = slice(start, start + block)
                here, there = self.strings.take(as_arrow(rows[part])), other.strings.take(as_arrow(other_rows[part]))
                same[part] = as_numpy(pc.equal(*_same_type(here, there)))
            return same
        partner = np.zeros(self.n, dtype=np.int32 if other.n < 2**31 else np.int64)
        partner[rows] = other_rows
        every = np.empty(self.n, dtype=bool)
        for start in range(0, self.n, block):
            here = self.chunks.slice(start, block)
            there = other.strings.take(as_arrow(partner[start : start + block]))
            every[start : start + len(here)] = as_numpy(pc.equal(*_same_type(here, there)))
        return every[rows]

    def check_unique(self, rows: np.ndarray, codes: np.ndarray, k: int) -> None:
        """MuscleError naming the first duplicated id and its first two rows; `rows` ascending."""
        from muscle_ray.errors import MuscleError

        counts = np.bincount(codes, minlength=k)
        if len(counts) and counts.max() > 1:
            dup = np.flatnonzero(counts[codes] > 1)
            second = dup[1:][codes[dup[1:]] == codes[dup[0]]][0]
            value = self.column[int(rows[dup[0]])].as_py()
            raise MuscleError(
                f"{self.name}: column 'id' has duplicate id {value!r} at rows {rows[dup[0]]} and {rows[second]}"
            )


def _same_type(a: pa.Array | pa.ChunkedArray, b: pa.Array | pa.ChunkedArray) -> tuple:
    """Two string arrays (or chunked arrays) of one type, for comparing."""
    return (a, b) if a.type == b.type else (a.cast(pa.large_string()), b.cast(pa.large_string()))


def _offsets(strings: pa.Array) -> np.ndarray:
    """A string array's offsets into its value buffer (int32 for string, int64 for large_string)."""
    width = 8 if pa.types.is_large_string(strings.type) else 4
    return np.frombuffer(strings.buffers()[1], f"<i{width}", len(strings) + 1, strings.offset * width)


def _word_view(strings: pa.Array) -> np.ndarray:
    """`view[i]`: the 8 bytes at offset i of the value buffer as a little-endian integer."""
    data = strings.buffers()[2]
    size = 0 if data is None else data.size
    raw = np.frombuffer(data, np.uint8) if size >= 8 else np.zeros(8, np.uint8)  # tiny: a padded copy
    if 0 < size < 8:
        raw[:size] = np.frombuffer(data, np.uint8)
    return np.ndarray((len(raw) - 7,), dtype="<u8", buffer=raw, strides=(1,))


def _hash_block(words: np.ndarray, starts: np.ndarray, ends: np.ndarray, out: np.ndarray) -> None:
    """Hash values [starts, ends) of one block into `out`, one 8-byte word position at a time.

    A value of c words mixes in words 0 .. c - 2 (aligned) and then the 8 bytes ending it;
    one under 8 bytes is its bytes alone, read from the 8 ending it (or from the buffer's
    first 8), shifted down and masked.
    """
    starts, ends = starts.astype(np.int64), ends.astype(np.int64)
    lens = ends - starts
    short = lens < 8
    if short.any():
        at = np.where(short, np.maximum(ends - 8, 0), starts)
        w = words[at] >> ((starts - at) << 3).astype(np.uint64)
        w &= _MASKS[np.minimum(lens, 8)]
    else:
        w = words[starts]
    h = lens.astype(np.uint64)
    _mix(h, w)
    _mix_words(words, starts, ends, h, 1)
    out[:] = _finalize(h)


def _mix_words(words: np.ndarray, starts: np.ndarray, ends: np.ndarray, h: np.ndarray, j: int) -> None:
    """Mix word positions j, j + 1, ... into `h`. Every row runs through the same numpy calls
    (rows out of words keep their hash) until under a quarter still has words: those go on
    alone, so a few long ids cost their own length, not the block's rows times it."""
    while True:
        active = ends - starts > 8 * j
        left = int(np.count_nonzero(active))
        if not left:
            return
        if left * 4 < len(h):
            rows = np.flatnonzero(active)
            g = h[rows]
            _mix_words(words, starts[rows], ends[rows], g, j)
            h[rows] = g
            return
        pos = np.minimum(starts + 8 * j, ends - 8)
        if left == len(h):
            _mix(h, words[pos])
        else:
            np.maximum(pos, 0, out=pos)  # a finished short value's position may point before the buffer
            g = h.copy()
            _mix(g, words[pos])
            np.copyto(h, g, where=active)
        j += 1


def _mix(h: np.ndarray, w: np.ndarray) -> None:
    h += w
    h *= _K
    h ^= h >> np.uint64(31)


_K = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: odd, so multiplying is a bijection
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)  # the low k bytes


def _finalize(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: every input bit flips each output bit with p ~ 1/2."""
    for m in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, None):
        h ^= h >> np.uint64(33)
        if m is not None:
            h *= np.uint64(m)
    return h


def _unmatched(table: pa.Table, matched: np.ndarray) -> list[str]:
    """The first few ids left unmatched, in row order (scalar reads: a take would concatenate the chunks)."""
    if len(matched) == table.num_rows:
        return []
    mask = np.ones(table.num_rows, dtype=bool)
    mask[matched] = False
    column = table.column("id")
    return [column[int(row)].as_py() for row in np.flatnonzero(mask)[:EXAMPLES]]


# --- discrete --------------------------------------------------------------------------


def quadrant_codes(correct_old: np.ndarray, correct_new: np.ndarray, same_prediction: np.ndarray) -> np.ndarray:
    """Per-instance `Quadrant` code."""
    co, cn = correct_old.astype(bool), correct_new.astype(bool)
    codes = np.full(len(co), Quadrant.NEGATIVE_FLIP, dtype=np.int8)
    codes[co & cn] = Quadrant.BOTH_RIGHT
    codes[~co & cn] = Quadrant.POSITIVE_FLIP
    both_wrong = ~co & ~cn
    codes[both_wrong & same_prediction] = Quadrant.BOTH_WRONG_SAME
    codes[both_wrong & ~same_prediction] = Quadrant.BOTH_WRONG_DIFFERENT
    return codes


def discrete_metrics(
    correct_old: np.ndarray,
    correct_new: np.ndarray,
    same_prediction: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """acc, NFR, PFR, NFR_mc, quadrants, BTC, BEC, McNemar p and bootstrap CIs."""
    co, cn, same = (np.asarray(x).astype(bool, copy=False) for x in (correct_old, correct_new, same_prediction))
    n = len(co)
    # One pass: every (old right, new right, same answer) combination counted at once.
    cell = co.view(np.uint8) << 2
    cell |= cn.view(np.uint8) << 1
    cell |= same.view(np.uint8)
    c = np.bincount(cell, minlength=8)
    both_right, pos = int(c[0b111] + c[0b110]), int(c[0b011] + c[0b010])
    bw_same, bw_diff, neg = int(c[0b001]), int(c[0b000]), int(c[0b101] + c[0b100])
    counts = np.array([both_right, pos, bw_same, bw_diff, neg], dtype=np.int64)  # in Quadrant order
    nfr_mc_count = int(c[0b000] + c[0b100])  # new wrong with another answer
    old_right = both_right + neg
    new_wrong = bw_same + bw_diff + neg
    boot = stats.bootstrap_counts(counts, n_boot, seed) / max(n, 1)
    return {
        "acc_old": _div(old_right, n),
        "acc_new": _div(both_right + pos, n),
        "nfr": _div(neg, n),
        "pfr": _div(pos, n),
        "nfr_mc": _div(nfr_mc_count, n),
        "quadrants": dict(zip(QUADRANTS, (int(x) for x in counts))),
        "btc": _div(both_right, old_right),
        "bec": _div(bw_same + bw_diff, new_wrong),
        "mcnemar_p": stats.mcnemar_p(pos, neg),
        "ci": {
            "delta_acc": stats.percentile_ci(boot[:, 1] - boot[:, 4]) if n and n_boot else None,
            "nfr": stats.percentile_ci(boot[:, 4]) if n and n_boot else None,
            "pfr": stats.percentile_ci(boot[:, 1]) if n and n_boot else None,
        },
    }


# --- continuous ------------------------------------------------------------------------


def direction_codes(d: np.ndarray, epsilon: float = 0.0) -> np.ndarray:
    """Per-instance index into DIRECTIONS: improved (D > eps), tie, regressed (D < -eps)."""
    codes = np.ones(len(d), dtype=np.int8)
    codes[d > epsilon] = 0
    codes[d < -epsilon] = 2
    return codes


def continuous_metrics(
    s_old: np.ndarray,
    s_new: np.ndarray,
    epsilon: float = 0.0,
    n_boot: int = 2000,
    seed: int = 0,
    mean_ci: bool = True,
) -> dict:
    """Mean scores, PFR/NFR of D = S(new) - S(old) beyond ±eps, m_g, m_r, sign test, CIs.

    The CIs of PFR and NFR use the exact multinomial shortcut on (improved, tie, regressed)
    counts; the CI of mean(D) needs a row-level bootstrap, O(n_boot * N), so `mean_ci=False`
    skips it where the discrete Δacc interval already answers the question.
    """
    s_old = np.asarray(s_old, dtype=np.float64)
    s_new = np.asarray(s_new, dtype=np.float64)
    d = s_new - s_old
    n = len(d)
    up, down = d > epsilon, d < -epsilon
    improved, regressed = int(np.count_nonzero(up)), int(np.count_nonzero(down))
    counts = np.array([improved, n - improved - regressed, regressed], dtype=np.int64)  # DIRECTIONS order
    boot = stats.bootstrap_counts(counts, n_boot, seed) / max(n, 1)
    return {
        "score_old": _mean(s_old),
        "score_new": _mean(s_new),
        "pfr": _div(improved, n),
        "nfr": _div(regressed, n),
        "m_g": _mean(d[up]),
        "m_r": _mean(-d[down]),
        "improved": improved,
        "regressed": regressed,
        "sign_test_p": stats.mcnemar_p(improved, regressed),
        "ci": {
            "delta_score": stats.bootstrap_mean_ci(d, n_boot, seed) if n and n_boot and mean_ci else None,
            "nfr": stats.percentile_ci(boot[:, 2]) if n and n_boot else None,
            "pfr": stats.percentile_ci(boot[:, 0]) if n and n_boot else None,
        },
    }


def _div(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if len(x) else None


def clean(obj):
    """NaN/inf -> None so the summary is strict JSON."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
