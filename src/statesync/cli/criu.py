"""``statesync criu ...``: check, info, diff, incremental, flatten."""
from __future__ import annotations

import time

from statesync.criu import ImageSet, check, diff, flatten, info, write_incremental
from statesync.criu.images import PE_LAZY, PE_PARENT, PE_PRESENT, VMA_DTYPE  # noqa: F401  (re-exported)

# --------------------------------------------------------------------------- CLI


def cli_register(sub) -> None:
    p = sub.add_parser("criu", help="CRIU images: info, diff, incremental, flatten, check")
    csub = p.add_subparsers(dest="criu_command", metavar="SUBCOMMAND")
    c = csub.add_parser("info", help="pages, bytes, VMAs and parent chain of an image set")
    c.add_argument("dir")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cli_info)
    c = csub.add_parser("diff", help="pages of NEW whose content differs from OLD")
    c.add_argument("old")
    c.add_argument("new")
    c.add_argument("--pid", type=int)
    c.add_argument("--list", action="store_true", help="print every changed page address")
    c.set_defaults(func=_cli_diff)
    c = csub.add_parser("incremental", help="write NEW as an incremental set over --parent")
    c.add_argument("new")
    c.add_argument("--parent", required=True)
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=_cli_incremental)
    c = csub.add_parser("flatten", help="write a chain as one self-contained set")
    c.add_argument("dir")
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=_cli_flatten)
    c = csub.add_parser("check", help="find CRIU and report its version and features")
    c.set_defaults(func=_cli_check)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def _cli_info(a) -> int:
    import json
    d = info(a.dir)
    if a.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['path']}")
    print(f"  chain: {' -> '.join(d['chain'])}")
    for p in d["processes"]:
        print(f"  {p['pagemap']}: {p['pages']} pages ({_mb(p['bytes'])}), "
              f"{p['pages_here']} stored here, {p['pages_in_parent']} in parent, "
              f"{p['entries']} entries" + (f", {p['vmas']} VMAs ({_mb(p['vma_bytes'])})"
                                          if p.get("vmas") else ""))
    return 0


def _cli_diff(a) -> int:
    t0 = time.monotonic()
    new = ImageSet(a.new)
    d = diff(a.old, new, a.pid)
    dt = time.monotonic() - t0
    n = new.table(a.pid).addrs.size
    print(f"{len(d)} of {n} pages differ ({_mb(d.nbytes)}) in {dt * 1000:.1f} ms")
    if a.list:
        for x in d.pages.tolist():
            print(f"{x:#x}")
    return 0


def _cli_incremental(a) -> int:
    r = write_incremental(a.new, a.parent, a.output)
    print(f"{r.path}: {r.pages_written} pages stored, {r.pages_in_parent} in parent, "
          f"{_mb(r.nbytes)}")
    return 0


def _cli_flatten(a) -> int:
    r = flatten(a.dir, a.output)
    print(f"{r.path}: {r.pages_written} pages, {_mb(r.nbytes)}")
    return 0


def _cli_check(a) -> int:
    i = check()
    print(f"criu: {i.path or 'not found'}  version: {i.version}  ok: {i.ok}")
    for k, v in sorted(i.features.items()):
        print(f"  {k}: {'yes' if v else 'no'}" + ("" if v else f"  ({i.reasons.get(k, '')})"))
    if "criu" in i.reasons:
        print(f"  {i.reasons['criu']}")
    return 0 if i.ok else 1
