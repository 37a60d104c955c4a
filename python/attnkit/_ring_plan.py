"""Ring attention's index arithmetic (pure Python, no torch): which global positions each rank
holds under a sharding, and which kernel calls cover a (query shard, key shard) pair with the
causal mask expressed as a window bound. The ring itself (``_ring``) explains the scheme.
"""
import math


# ---- layouts: which global positions a rank holds -----------------------------------------------


def chunk_sizes(total: int, parts: int) -> list:
    """Sizes of ``torch.tensor_split(x, parts)`` for a length ``total``: the first
    ``total % parts`` chunks are one longer."""
    base, rem = divmod(total, parts)
    return [base + (1 if i < rem else 0) for i in range(parts)]


def _starts(sizes):
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += n
    return out


def zigzag_chunks(world: int, rank: int) -> tuple:
    """The two chunks (of 2W) that rank holds in the zigzag layout: r and 2W-1-r."""
    return rank, 2 * world - 1 - rank


def shard_lengths(total: int, world: int, sharding: str) -> list:
    """Tokens each rank holds when ``total`` tokens are sharded by :func:`shard_sequence`."""
    if sharding == "contiguous":
        return chunk_sizes(total, world)
    sizes = chunk_sizes(total, 2 * world)
    return [sizes[a] + sizes[b] for a, b in (zigzag_chunks(world, r) for r in range(world))]


def segments(lengths: list, rank: int, sharding: str) -> list:
    """Global (start, length) of the runs of consecutive positions rank holds, in local order.
    ``lengths``: every rank's shard length (validated against the layout by the caller)."""
    world = len(lengths)
    if sharding == "contiguous":
        return [(sum(lengths[:rank]), lengths[rank])]
    sizes = chunk_sizes(sum(lengths), 2 * world)
    starts = _starts(sizes)
    return [(starts[c], sizes[c]) for c in zigzag_chunks(world, rank) if sizes[c] > 0]


# ---- blocks: which kernel calls cover a (query shard, key shard) pair ---------------------------


def _local(segs):
    """[(local_start, global_start, length)] of segments given in local order."""
    out, off = [], 0
    for g, n in segs:
        out.append((off, g, n))
        off += n
    return out


def plan_blocks(q_segs: list, k_segs: list) -> list:
    """Kernel calls that cover exactly the causal (query, key) pairs of a query shard and a key
    shard, each pair once.

    ``q_segs`` / ``k_segs``: global (start, length) runs in local order. Returns a list of
    ``(q_lo, q_hi, k_lo, k_hi, right)``: rows ``q_lo:q_hi`` of the local queries against keys
    ``k_lo:k_hi``, with ``right`` None (no mask) or the window's right bound in top-left
    alignment (key j' allowed for query i' of the block when j' <= i' + right; 0 = causal).

    A (query segment, key segment) pair is fully visible, fully masked or crossed by the
    diagonal, where local key j is allowed for local query i when j <= i + R with
    R = (a - b) + (kj - qi) (a, b the segments' global starts, qi, kj their local starts). One
    call over the rectangle of every segment that takes part works when a single R satisfies
    every pair inside it (full pairs: R at least their largest j - i; masked pairs: R below
    their smallest j - i; crossed pairs: exactly their R) and the kernel's bound
    R - k_lo + q_lo is >= 0; else each visible or crossed pair is its own call (query rows that
    see no key of a crossed pair are trimmed off).
    """
    ql, kl = _local(q_segs), _local(k_segs)
    pairs = []  # (qi, m, kj, n, kind, R)
    for qi, a, m in ql:
        for kj, b, n in kl:
            if m == 0 or n == 0:
                continue
            if b + n - 1 <= a:
                kind = "full"
            elif b > a + m - 1:
                kind = "skip"
            else:
                kind = "cross"
            pairs.append((qi, m, kj, n, kind, (a - b) + (kj - qi)))
    live = [p for p in pairs if p[4] != "skip"]
    if not live:
        return []
    q_lo = min(p[0] for p in live)
    q_hi = max(p[0] + p[1] for p in live)
    k_lo = min(p[2] for p in live)
    k_hi = max(p[2] + p[3] for p in live)
    inside = [p for p in pairs if p[0] < q_hi and p[0] + p[1] > q_lo and p[2] < k_hi and p[2] + p[3] > k_lo]
    lo, hi, exact = -math.inf, math.inf, set()
    for qi, m, kj, n, kind, r in inside:
        if kind == "full":
            lo = max(lo, (kj + n - 1) - qi)
        elif kind == "skip":
            hi = min(hi, kj - (qi + m - 1) - 1)
        else:
            exact.add(r)
    if not exact and hi == math.inf:
        return [(q_lo, q_hi, k_lo, k_hi, None)]
    R = exact.pop() if len(exact) == 1 else (None if exact else lo)
    if R is not None and lo <= R <= hi and R - k_lo + q_lo >= 0:
        right = int(R - k_lo + q_lo)
        if R >= (k_hi - 1) - q_lo:  # the bound allows every key of the rectangle
            right = None
        return [(q_lo, q_hi, k_lo, k_hi, right)]
    calls = []
    for qi, m, kj, n, kind, r in live:
        if kind == "full":
            calls.append((qi, qi + m, kj, kj + n, None))
            continue
        right = r - kj + qi  # = a - b
        trim = max(0, -right)  # query rows before the key segment starts see none of it
        calls.append((qi + trim, qi + m, kj, kj + n, right + trim))
    return calls
