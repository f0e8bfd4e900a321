"""``statesync criu ...``: check, info, diff, incremental, flatten."""
from __future__ import annotations

import time

from statesync.cli._common import (
    EXIT_PREREQ,
    add_json,
    check_new_dir,
    check_output_file,
    input_dir,
    pid_arg,
    write_json,
)
from statesync.criu import ImageSet, check, diff, flatten, info, write_incremental
from statesync.criu.images import PE_LAZY, PE_PARENT, PE_PRESENT, VMA_DTYPE  # noqa: F401  (re-exported)

# --------------------------------------------------------------------------- CLI


def cli_register(sub) -> None:
    p = sub.add_parser("criu", help="CRIU images: info, diff, incremental, flatten, check")
    csub = p.add_subparsers(dest="criu_command", metavar="SUBCOMMAND", parser_class=type(p))
    c = csub.add_parser("info", help="pages, bytes, VMAs and parent chain of an image set")
    c.add_argument("dir", type=input_dir, help="image set directory")
    add_json(c)
    c.set_defaults(func=_cli_info)
    c = csub.add_parser("diff", help="pages of NEW whose content differs from OLD")
    c.add_argument("old", type=input_dir, help="older image set directory")
    c.add_argument("new", type=input_dir, help="newer image set directory (same process)")
    c.add_argument("--pid", type=pid_arg, help="the process in the sets (default: the root)")
    c.add_argument("--list", action="store_true", help="print every changed page address")
    add_json(c)
    c.set_defaults(func=_cli_diff)
    c = csub.add_parser("incremental", help="write NEW as an incremental set over --parent")
    c.add_argument("new", type=input_dir, help="full image set to store incrementally")
    c.add_argument("--parent", type=input_dir, required=True, help="parent image set")
    c.add_argument("-o", "--output", required=True,
                   help="new directory to write (must not exist, or be empty)")
    add_json(c)
    c.set_defaults(func=_cli_incremental)
    c = csub.add_parser("flatten", help="write a chain as one self-contained set")
    c.add_argument("dir", type=input_dir, help="image set (last of a parent chain)")
    c.add_argument("-o", "--output", required=True,
                   help="new directory to write (must not exist, or be empty)")
    add_json(c)
    c.set_defaults(func=_cli_flatten)
    c = csub.add_parser("check", help="find CRIU and report its version and features",
                        description="Exit status 3 when CRIU is missing or does not work.")
    add_json(c)
    c.set_defaults(func=_cli_check)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def _cli_info(a) -> int:
    check_output_file(a.json, "--json")
    d = info(a.dir)
    if a.json is not None:
        write_json(d, a.json)
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
    check_output_file(a.json, "--json")
    t0 = time.monotonic()
    new = ImageSet(a.new)
    d = diff(a.old, new, a.pid)
    dt = time.monotonic() - t0
    n = new.table(a.pid).addrs.size
    if a.json is not None:
        out = {"old": a.old, "new": a.new, "pages": int(n), "changed_pages": len(d),
               "changed_bytes": int(d.nbytes), "seconds": dt}
        if a.list:
            out["changed"] = [f"{x:#x}" for x in d.pages.tolist()]
        write_json(out, a.json)
        return 0
    print(f"{len(d)} of {n} pages differ ({_mb(d.nbytes)}) in {dt * 1000:.1f} ms")
    if a.list:
        for x in d.pages.tolist():
            print(f"{x:#x}")
    return 0


def _result(r) -> dict:
    return {"path": r.path, "pages_written": r.pages_written,
            "pages_in_parent": getattr(r, "pages_in_parent", 0), "bytes": r.nbytes}


def _cli_incremental(a) -> int:
    check_new_dir(a.output, "--output")
    check_output_file(a.json, "--json")
    r = write_incremental(a.new, a.parent, a.output)
    if a.json is not None:
        write_json(_result(r), a.json)
        return 0
    print(f"{r.path}: {r.pages_written} pages stored, {r.pages_in_parent} in parent, "
          f"{_mb(r.nbytes)}")
    return 0


def _cli_flatten(a) -> int:
    check_new_dir(a.output, "--output")
    check_output_file(a.json, "--json")
    r = flatten(a.dir, a.output)
    if a.json is not None:
        write_json(_result(r), a.json)
        return 0
    print(f"{r.path}: {r.pages_written} pages, {_mb(r.nbytes)}")
    return 0


def _cli_check(a) -> int:
    check_output_file(a.json, "--json")
    i = check()
    if a.json is not None:
        write_json(i.as_dict(), a.json)
        return 0 if i.ok else EXIT_PREREQ
    print(f"criu: {i.path or 'not found'}  version: {i.version}  ok: {i.ok}")
    for k, v in sorted(i.features.items()):
        print(f"  {k}: {'yes' if v else 'no'}" + ("" if v else f"  ({i.reasons.get(k, '')})"))
    if "criu" in i.reasons:
        print(f"  {i.reasons['criu']}")
    return 0 if i.ok else EXIT_PREREQ
