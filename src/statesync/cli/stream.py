"""``statesync stream stats``."""
from __future__ import annotations

from statesync.cli._common import add_json, check_output_file, input_file, positive_int, write_json
from statesync.errors import StateSyncError, StreamError
from statesync.stream.decoder import StreamReader
from statesync.stream.format import (
    DEFAULT_MAX_BLOCK_BYTES,
    FLAG_DEDUP,
    FLAG_LZ4,
    FLAG_XOR,
    KIND_NAMES,
    MAX_BLOCK_PAGES,
    StreamStats,
)

# ---------------------------------------------------------------------------- CLI


def _stats_dict(st: StreamStats, n: int, offset: int) -> dict:
    return {"stream": n, "offset": offset, "stream_id": st.stream_id, "round": st.round,
            "page_size": st.page_size,
            "options": [name for bit, name in ((FLAG_LZ4, "lz4"), (FLAG_XOR, "xor"),
                                               (FLAG_DEDUP, "dedup")) if st.flags & bit],
            "blocks": st.blocks, "records": st.records, "pages_total": st.total_pages,
            "records_by_kind": dict(st.records_by_kind), "pages_by_kind": dict(st.pages),
            "page_bytes": st.bytes_out, "payload_bytes": st.payload_bytes,
            "stream_bytes": st.bytes_in}


def _cmd_stats(args) -> int:
    check_output_file(args.json, "--json")
    out = []
    with open(args.file, "rb") as f:
        reader = StreamReader(f, max_block_pages=MAX_BLOCK_PAGES, max_pages=1 << 40,
                              max_block_bytes=args.max_block_mib << 20)
        n = 0
        while True:
            try:
                st = reader.apply(None)
            except StreamError as exc:
                raise StateSyncError(f"{args.file}: {exc}") from None
            if st is None:
                break
            n += 1
            if args.json is not None:
                out.append(_stats_dict(st, n, reader.offset - st.bytes_in))
            else:
                _print_stats(st, n, reader.offset - st.bytes_in)
        if n == 0:
            raise StreamError(f"{args.file}: empty file, no stream in it", offset=0)
    if args.json is not None:
        write_json({"file": args.file, "streams": out}, args.json)
    return 0


def _print_stats(st: StreamStats, n: int, offset: int):
    flags = ",".join(name for bit, name in ((FLAG_LZ4, "lz4"), (FLAG_XOR, "xor"),
                                            (FLAG_DEDUP, "dedup")) if st.flags & bit) or "-"
    print(f"stream {n} at byte {offset}: id {st.stream_id} round {st.round} "
          f"page size {st.page_size} options {flags}")
    print(f"  blocks {st.blocks}  records {st.records}  pages {st.total_pages}")
    print(f"  {'kind':<6}{'records':>10}{'pages':>12}{'share':>9}")
    for k in KIND_NAMES.values():
        share = st.pages[k] / st.total_pages if st.total_pages else 0.0
        print(f"  {k:<6}{st.records_by_kind[k]:>10}{st.pages[k]:>12}{share:>8.1%}")
    print(f"  page bytes {st.bytes_out}  record payload {st.payload_bytes}  stream bytes "
          f"{st.bytes_in}")
    if st.bytes_out:
        print(f"  stream/page bytes {st.ratio:.4f}  (saving {1 - st.ratio:.1%}); "
              f"payload/page bytes {st.payload_bytes / st.bytes_out:.4f}")


def cli_register(subparsers):
    p = subparsers.add_parser("stream", help="page-delta streams (wire format)")
    sub = p.add_subparsers(dest="stream_command", metavar="SUBCOMMAND", parser_class=type(p))
    s = sub.add_parser("stats", help="check a stream file and print records per kind and ratios")
    s.add_argument("file", type=input_file, help="file holding one or more concatenated streams")
    add_json(s)
    s.add_argument("--max-block-mib", type=positive_int, default=DEFAULT_MAX_BLOCK_BYTES >> 20,
                   metavar="MIB", help="refuse blocks larger than this (block pages x page "
                   "size, MiB; default %(default)s): bounds the memory the check uses")
    s.set_defaults(func=_cmd_stats)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
