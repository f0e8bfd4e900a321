"""Where the stream encoder's time goes, and what skipping LZ4 on incompressible pages could win.

Question (issue 4's missed target: full encoder >= 2x plain LZ4 frame throughput):
is there CPU to save outside LZ4, and how much would a perfect "this page will not
compress" predictor save if such pages were stored RAW in uncompressed blocks?

On each ``full`` dataset of benchmarks/stream_corpus.py (every present page of a
real process), all in one run, strategies interleaved, best CPU time of ``--reps``:

- ``lz4 frame``: python-lz4 ``lz4.frame.compress`` of the pages (the baseline);
- ``encoder``: ``statesync.stream.Encoder(xor=False, threads=1)``, whole stream;
- ``records``: the C record building alone (zero/dup classification, hashing,
  payload assembly; no LZ4);
- ``lz4 of payloads``: our LZ4 frames (``_core.lz4f_compress_into``) of the block
  payloads the encoder builds;
- ``lz4 w/o incompressible``: the same frames with every page that LZ4 cannot
  shrink below 95 % removed beforehand (an oracle, at no cost: an upper bound on what
  an entropy estimate could save).

Not a pytest-benchmark file (it answers a diagnostic question, not a target):

    .venv/bin/python benchmarks/stream_encoder_breakdown.py [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stream_corpus  # noqa: E402

PS = 4096
BLOCK = 256


def _payloads(pagenos, pages):
    """The block payloads the encoder builds (no previous content, dedup on)."""
    from statesync import _core
    out = np.empty(_core.codec_enc_bound(BLOCK, PS), np.uint8)
    sess = _core.EncodeSession(pagenos, pages, None, None, True, False, PS // 2)
    res, start, min_page, n = [], 0, 0, pages.shape[0]
    while start < n:
        plen, used, _ = sess.block(start, BLOCK, min_page, out)
        res.append(out[:plen].copy())
        min_page = int(pagenos[start + used - 1]) + 1
        start += used
    return res


def _lz4_payloads(payloads, fbuf):
    from statesync import _core
    return sum(_core.lz4f_compress_into(p, fbuf) for p in payloads)


def breakdown(addrs, pages, reps):
    import lz4.block
    import lz4.frame
    from statesync import _core, stream as S

    pagenos = addrs // np.uint64(PS)
    enc = S.Encoder(xor=False, dedup=True, threads=1)
    payloads = _payloads(pagenos, pages)
    # the oracle: pages LZ4 cannot shrink below 95 % (measured page by page)
    nz = pages.any(axis=1)
    csize = np.array([len(lz4.block.compress(pages[i].tobytes(), store_size=False))
                      if nz[i] else 0 for i in range(pages.shape[0])])
    inc = nz & (csize >= 0.95 * PS)
    keep = ~inc
    payloads_kept = _payloads(pagenos[keep], np.ascontiguousarray(pages[keep]))
    fbuf = np.empty(_core.lz4f_bound(_core.codec_enc_bound(BLOCK, PS)), np.uint8)

    def build():
        sess = _core.EncodeSession(pagenos, pages, None, None, True, False, PS // 2)
        out = np.empty(_core.codec_enc_bound(BLOCK, PS), np.uint8)
        start, min_page, n = 0, 0, pages.shape[0]
        while start < n:
            _, used, _ = sess.block(start, BLOCK, min_page, out)
            min_page = int(pagenos[start + used - 1]) + 1
            start += used

    cases = {
        "lz4 frame": lambda: lz4.frame.compress(pages),
        "encoder": lambda: b"".join(enc.encode(addrs, pages)),
        "records": build,
        "lz4 of payloads": lambda: _lz4_payloads(payloads, fbuf),
        "lz4 w/o incompressible": lambda: _lz4_payloads(payloads_kept, fbuf),
    }
    best = {k: float("inf") for k in cases}
    for _ in range(reps):                       # interleaved: load hits all alike
        for k, fn in cases.items():
            c0 = time.process_time()
            fn()
            best[k] = min(best[k], time.process_time() - c0)
    sizes = {"lz4 frame": len(lz4.frame.compress(pages)),
             "encoder": len(b"".join(enc.encode(addrs, pages))),
             "skip (oracle)": _lz4_payloads(payloads_kept, fbuf) + int(inc.sum()) * PS}
    return best, sizes, float(inc.mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=stream_corpus.DEFAULT_DIR)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    corpus = stream_corpus.load(args.corpus)
    for name, d in corpus.items():
        a, p = d["addrs"], d["v1"]
        best, sizes, inc = breakdown(a, p, args.reps)
        base = best["lz4 frame"]
        other = best["encoder"] - best["records"] - best["lz4 of payloads"]
        skip = best["encoder"] - best["lz4 of payloads"] + best["lz4 w/o incompressible"]
        print(f"{name}/full: {p.shape[0]} pages ({p.nbytes / 2**20:.1f} MiB), "
              f"{inc:.1%} incompressible (LZ4 >= 95 %)")
        for k, t in best.items():
            print(f"  {k:<24}{t * 1e3:>8.1f} ms CPU  {p.nbytes / t / 1e9:>6.2f} GB/s")
        print(f"  encoder outside records and LZ4 (copies, hashes, Python): {other * 1e3:.1f} ms "
              f"({other / best['encoder']:.0%})")
        print(f"  encoder vs lz4 frame: {base / best['encoder']:.2f}x; with oracle skip at no "
              f"cost: {base / skip:.2f}x (bound); sizes vs lz4 frame: encoder "
              f"{sizes['encoder'] / sizes['lz4 frame']:.4f}, skip "
              f"{sizes['skip (oracle)'] / sizes['lz4 frame']:.4f}")


if __name__ == "__main__":
    main()
