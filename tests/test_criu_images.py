"""statesync's CRIU image reader/writer on synthetic image sets (no root needed) and on
hostile input: every malformed file gives a CriuImageError naming file and offset,
never a crash, hang or an allocation sized by an untrusted field. Fuzzed with
hypothesis over mutated synthetic and real CRIU images."""
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import have_root, require
from statesync import criu
from statesync.criu import images as ci
from statesync.errors import CriuImageError

PS = 4096
U32 = struct.Struct("<I")


def _img(magic, entries, common=True):
    out = (U32.pack(ci.IMG_COMMON_MAGIC) if common else b"") + U32.pack(magic)
    for e in entries:
        out += U32.pack(len(e)) + e
    return out


def _msg(*fields):
    return b"".join(ci.enc_field_varint(f, v) for f, v in fields)


def _len_field(no, payload):
    return ci.enc_varint(no << 3 | 2) + ci.enc_varint(len(payload)) + payload


def make_set(d, runs, contents, parent=None, pid=1, raw_entries=None, vmas=None):
    """A minimal image set at d: runs = [(vaddr, nr_pages, flags)], contents = bytes of
    the PE_PRESENT pages in order. Only the images statesync reads are made."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "inventory.img"), "wb") as f:
        f.write(_img(ci.INVENTORY_MAGIC, [_msg((1, 2))], common=False))
    with open(os.path.join(d, "pstree.img"), "wb") as f:
        f.write(_img(ci.PSTREE_MAGIC, [_msg((1, pid), (2, 0), (3, pid), (4, pid), (5, pid))]))
    if raw_entries is None:
        raw_entries = [_msg((1, v), (2, n), (4, fl)) for v, n, fl in runs]
    with open(os.path.join(d, f"pagemap-{pid}.img"), "wb") as f:
        f.write(_img(ci.PAGEMAP_MAGIC, [_msg((1, 7))] + raw_entries))
    with open(os.path.join(d, "pages-7.img"), "wb") as f:
        f.write(contents)
    vmas = (
        vmas
        if vmas is not None
        else [(min(r[0] for r in runs), max(r[0] + r[1] * PS for r in runs))]
        if runs
        else []
    )
    mm = b"".join(_len_field(14, _msg((1, s), (2, e), (3, 0), (4, 0), (5, 3), (6, 0x22), (7, 1),
                                      (8, ci.enc_varint(0) and 1)))  # fd -1 zigzag = 1
                  for s, e in vmas)
    with open(os.path.join(d, f"mm-{pid}.img"), "wb") as f:
        f.write(_img(ci.MM_MAGIC, [_msg((1, 0), (2, 0)) + mm]))
    with open(os.path.join(d, "core-1.img"), "wb") as f:
        f.write(b"opaque non-memory image")
    if parent is not None:
        os.symlink(os.path.relpath(parent, d), os.path.join(d, "parent"))
    return d


def pages_of(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, PS), dtype=np.uint8)


BASE = 0x7F0000000000


@pytest.fixture
def two_sets(tmp_path):
    old = pages_of(20, 1)
    new = old.copy()
    new[[2, 3, 11]] ^= 1
    runs = [(BASE, 12, ci.PE_PRESENT | ci.PE_LAZY), (BASE + 16 * PS, 8, ci.PE_PRESENT)]
    a = make_set(str(tmp_path / "a"), runs, old.tobytes())
    # b has one extra page at the end of its second run (a new page).
    extra = pages_of(1, 9)
    b = make_set(str(tmp_path / "b"), [runs[0], (BASE + 16 * PS, 9, ci.PE_PRESENT)],
                 np.concatenate([new, extra]).tobytes())
    return a, b, old, np.concatenate([new, extra])


def test_image_set_reads_addresses_pages_vmas(two_sets):
    a, b, old, new = two_sets
    s = criu.ImageSet(a)
    want = np.array([BASE + i * PS for i in range(12)] + [BASE + (16 + i) * PS for i in range(8)],
                    dtype=np.uint64)
    assert np.array_equal(s.addresses(), want)
    assert np.array_equal(s.pages(), old)
    assert not s.pages().flags.writeable          # zero-copy view of the mmap
    assert s.npages == 20 and s.nbytes == 20 * PS and s.root_pid == 1
    v = s.vmas()
    assert v["start"].tolist() == [BASE] and v["end"].tolist() == [BASE + 24 * PS]
    assert v["fd"].tolist() == [-1]
    assert np.array_equal(s.read([BASE + 17 * PS]), old[13:14])


def test_diff_finds_changed_and_new_pages(two_sets):
    a, b, old, new = two_sets
    d = criu.diff(a, b)
    assert d.pages.tolist() == [BASE + 2 * PS, BASE + 3 * PS, BASE + 11 * PS, BASE + 24 * PS]
    assert len(criu.diff(b, b)) == 0
    # Reverse: pages only in the old set are not reported.
    assert len(criu.diff(b, a)) == 3


def test_incremental_then_flatten_round_trip(two_sets, tmp_path):
    a, b, old, new = two_sets
    r = criu.write_incremental(b, a, tmp_path / "inc")
    assert (r.pages_written, r.pages_in_parent) == (4, 17)
    assert os.readlink(tmp_path / "inc" / "parent") == "../a"
    assert (tmp_path / "inc" / "core-1.img").read_bytes() == b"opaque non-memory image"
    s = criu.ImageSet(tmp_path / "inc")
    pm = s.pagemap()
    # Runs: [0,2) parent | [2,4) present | [4,11) parent | 11 present (lazy kept) | ...
    assert pm.flags[:4].tolist() == [ci.PE_PARENT | ci.PE_LAZY, ci.PE_PRESENT | ci.PE_LAZY,
                                     ci.PE_PARENT | ci.PE_LAZY, ci.PE_PRESENT | ci.PE_LAZY]
    assert pm.nr_pages[:4].tolist() == [2, 2, 7, 1]
    assert np.array_equal(s.pages(), new)
    assert os.path.getsize(tmp_path / "inc" / "pages-7.img") == 4 * PS
    f = criu.flatten(tmp_path / "inc", tmp_path / "flat")
    assert f.pages_written == 21 and not os.path.lexists(tmp_path / "flat" / "parent")
    assert (tmp_path / "flat" / "pages-7.img").read_bytes() == new.tobytes()
    assert np.array_equal(
        criu.ImageSet(tmp_path / "flat").addresses(), criu.ImageSet(b).addresses()
    )


def test_old_format_in_parent_and_missing_flags(tmp_path):
    p = make_set(str(tmp_path / "p"), [(BASE, 4, ci.PE_PRESENT)], pages_of(4, 2).tobytes())
    # Old CRIU: no flags field; in_parent=true means PE_PARENT, absent means PE_PRESENT.
    raw = [_msg((1, BASE), (2, 2), (3, 1)), _msg((1, BASE + 2 * PS), (2, 2))]
    c = make_set(str(tmp_path / "c"), None, pages_of(2, 3).tobytes(), parent=p, raw_entries=raw,
                 vmas=[(BASE, BASE + 4 * PS)])
    pm = criu.ImageSet(c).pagemap()
    assert pm.flags.tolist() == [ci.PE_PARENT, ci.PE_PRESENT]
    s = criu.ImageSet(c)
    assert np.array_equal(s.pages()[:2], pages_of(4, 2)[:2])
    assert np.array_equal(s.pages()[2:], pages_of(2, 3))


def test_64bit_nr_pages_preferred_and_written_back(tmp_path):
    # CRIU >= 4.2: compat_nr_pages (field 2) = 0, nr_pages in field 5.
    raw = [_msg((1, BASE), (2, 0), (4, ci.PE_PRESENT), (5, 3))]
    d = make_set(str(tmp_path / "w"), None, pages_of(3, 4).tobytes(), raw_entries=raw,
                 vmas=[(BASE, BASE + 3 * PS)])
    s = criu.ImageSet(d)
    assert s.pagemap().wide and s.npages == 3
    criu.flatten(d, tmp_path / "f")
    assert (tmp_path / "f" / "pagemap-1.img").read_bytes() == (
        tmp_path / "w" / "pagemap-1.img"
    ).read_bytes()


def test_write_image_set_replaces_and_adds_pages(two_sets, tmp_path):
    a, b, old, new = two_sets
    addrs = np.array(
        [BASE + 5 * PS, BASE + 13 * PS], dtype=np.uint64
    )  # replaced, new (in the VMA gap)
    repl = pages_of(2, 77)
    r = criu.write_image_set(a, tmp_path / "w", addrs, lambda x: repl)
    s = criu.ImageSet(tmp_path / "w")
    assert r.pages_written == 21
    assert np.array_equal(s.read(addrs), repl)
    assert np.array_equal(s.read([BASE]), old[:1])
    # Incremental against the template itself: only the two pages are stored.
    r = criu.write_image_set(a, tmp_path / "wi", addrs, repl, parent_dir=a)
    assert (r.pages_written, r.pages_in_parent) == (2, 19)
    assert np.array_equal(criu.ImageSet(tmp_path / "wi").read(addrs), repl)
    with pytest.raises(ValueError):
        criu.write_image_set(a, tmp_path / "bad", addrs[::-1], repl)
    with pytest.raises(ValueError, match="lies in no VMA"):
        criu.write_image_set(a, tmp_path / "bad", [BASE + 64 * PS], repl[:1])
    assert not os.path.exists(tmp_path / "bad")


def test_writes_are_atomic(two_sets, tmp_path):
    a, b, old, new = two_sets

    def failing(addrs):
        raise RuntimeError("page store went away")

    with pytest.raises(RuntimeError):
        criu.write_image_set(a, tmp_path / "out", [BASE], failing)
    with pytest.raises(CriuImageError):
        criu.write_incremental(b, tmp_path / "nonexistent", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]  # no temp dir left
    os.makedirs(tmp_path / "busy")
    (tmp_path / "busy" / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        criu.flatten(b, tmp_path / "busy")
    assert os.listdir(tmp_path / "busy") == ["keep"]


# --------------------------------------------------------------------------- bad input


def _expect(fn, path_part, offset=None):
    with pytest.raises(CriuImageError) as ei:
        fn()
    e = ei.value
    assert path_part in (e.path or ""), e
    if offset is not None:
        assert e.offset == offset, e
    assert isinstance(e, ValueError)
    return e


def _table(d):
    return lambda: criu.ImageSet(d).table()


def test_truncated_and_wrong_magic(tmp_path):
    d = make_set(str(tmp_path / "s"), [(BASE, 2, ci.PE_PRESENT)], pages_of(2, 1).tobytes())
    pm = os.path.join(d, "pagemap-1.img")
    data = open(pm, "rb").read()
    open(pm, "wb").write(data[:-3])                       # cut inside the last entry
    e = _expect(_table(d), "pagemap-1.img", offset=14)   # the entry's size field
    assert "past the end" in str(e)
    open(pm, "wb").write(data[:16])                       # cut inside a size field
    _expect(_table(d), "pagemap-1.img", offset=14)
    open(pm, "wb").write(data[:2])
    _expect(_table(d), "pagemap-1.img", offset=0)
    open(pm, "wb").write(data[:4] + U32.pack(ci.MM_MAGIC) + data[8:])
    e = _expect(_table(d), "pagemap-1.img", offset=4)
    assert "magic" in str(e)
    open(pm, "wb").write(b"\0" * 4 + data[4:])
    _expect(_table(d), "pagemap-1.img", offset=0)
    open(os.path.join(d, "inventory.img"), "wb").write(b"")
    _expect(lambda: criu.ImageSet(d), "inventory.img", offset=0)


def test_entry_size_past_end(tmp_path):
    d = make_set(str(tmp_path / "s"), [(BASE, 2, ci.PE_PRESENT)], pages_of(2, 1).tobytes())
    pm = os.path.join(d, "pagemap-1.img")
    data = bytearray(open(pm, "rb").read())
    head_len = U32.unpack_from(data, 8)[0]
    off = 12 + head_len
    data[off:off + 4] = U32.pack(0xFFFFFFF0)
    open(pm, "wb").write(data)
    e = _expect(_table(d), "pagemap-1.img", offset=off)
    assert "past the end" in str(e)


def test_nr_pages_larger_than_pages_file(tmp_path):
    d = make_set(
        str(tmp_path / "s"),
        [(BASE, 2, ci.PE_PRESENT), (BASE + 4 * PS, 2**40, ci.PE_PRESENT)],
        pages_of(2, 1).tobytes(),
    )
    t0 = time.monotonic()
    e = _expect(_table(d), "pagemap-1.img")
    assert "holds 2 pages" in str(e) and e.offset > 12
    assert time.monotonic() - t0 < 1.0


def test_huge_parent_run_is_refused_before_allocating(tmp_path):
    p = make_set(str(tmp_path / "p"), [(BASE, 2, ci.PE_PRESENT)], pages_of(2, 1).tobytes())
    c = make_set(str(tmp_path / "c"), [(BASE, 2**40, ci.PE_PARENT)], b"", parent=p)
    e = _expect(_table(c), "pagemap-1.img")
    assert "parent chain holds only 2" in str(e)


@pytest.mark.parametrize("runs,what", [
    ([(BASE, 4, ci.PE_PRESENT), (BASE + 2 * PS, 4, ci.PE_PRESENT)], "overlaps"),
    ([(BASE + 8 * PS, 1, ci.PE_PRESENT), (BASE, 1, ci.PE_PRESENT)], "out of order"),
    ([(BASE + 1, 1, ci.PE_PRESENT)], "page-aligned"),
    ([(BASE, 0, ci.PE_PRESENT)], "nr_pages 0"),
    ([(2**64 - PS, 2, ci.PE_PRESENT)], "end of the address space"),
    ([(BASE, 1, ci.PE_PRESENT | ci.PE_PARENT)], "both"),
    ([(BASE, 1, ci.PE_LAZY)], "neither"),
])
def test_bad_runs(tmp_path, runs, what):
    d = make_set(str(tmp_path / "s"), runs, pages_of(8, 1).tobytes(), vmas=[(BASE, BASE + PS)])
    e = _expect(_table(d), "pagemap-1.img")
    assert what in str(e) and e.offset is not None


def test_parent_chain_loop_and_missing(tmp_path):
    a = make_set(str(tmp_path / "a"), [(BASE, 1, ci.PE_PRESENT)], pages_of(1, 1).tobytes())
    b = make_set(str(tmp_path / "b"), [(BASE, 1, ci.PE_PARENT)], b"", parent=a)
    os.symlink("../b", os.path.join(a, "parent"))
    e = _expect(lambda: criu.ImageSet(b), "parent")
    assert "loops" in str(e)
    c = make_set(str(tmp_path / "c"), [(BASE, 1, ci.PE_PARENT)], b"", parent=str(tmp_path / "gone"))
    e = _expect(lambda: criu.ImageSet(c), "c/parent")
    assert "missing parent" in str(e)
    d = make_set(str(tmp_path / "d"), [(BASE, 1, ci.PE_PARENT)], b"")
    e = _expect(_table(d), "pagemap-1.img", offset=8 + 4 + 2)  # magics, head size, head
    assert "no parent link" in str(e)
    p = make_set(str(tmp_path / "p"), [(BASE + PS, 1, ci.PE_PRESENT)], pages_of(1, 1).tobytes())
    q = make_set(str(tmp_path / "q"), [(BASE, 1, ci.PE_PARENT)], b"", parent=p)
    e = _expect(_table(q), "q/pagemap-1.img")
    assert "no such page" in str(e)


@pytest.mark.parametrize("payload,what", [
    (b"\x08" + b"\xff" * 11, "varint longer"),
    (b"\x08\xff", "truncated varint"),
    (b"\x0b", "wire type"),
    (b"\x00\x01", "field number 0"),
    (b"\x0a\x7f", "runs past the end"),
    (b"\x09\x01\x02", "truncated fixed"),
])
def test_bad_protobuf(tmp_path, payload, what):
    d = make_set(str(tmp_path / "s"), None, b"", raw_entries=[payload], vmas=[(BASE, BASE + PS)])
    e = _expect(_table(d), "pagemap-1.img")
    assert what in str(e) and e.offset >= 16


# --------------------------------------------------------------------------- fuzzing


def _exercise(d):
    """Everything a reader of an image set does; must succeed or raise CriuImageError."""
    try:
        s = criu.ImageSet(d)
        for n in s.pagemap_names:
            t = s.table(n)
            if t.addrs.size:
                s.pages(n)[-1:].sum()
        s.vmas()
        s.pids()
        criu.diff(s, s)
        criu.info(d)
    except CriuImageError:
        pass


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(
        st.just("u32"), st.integers(0, 10**6), st.sampled_from([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 4096])
    ),
)


def _mutate(path, muts):
    data = bytearray(open(path, "rb").read())
    for kind, pos, val in muts:
        if not data and kind != "insert":
            continue
        pos = pos % (len(data) + (1 if kind == "insert" else 0)) if data else 0
        if kind == "flip":
            data[pos] ^= val
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = bytes([val])
        else:
            data[pos:pos + 4] = U32.pack(val)
    open(path, "wb").write(bytes(data))


def _fuzz_one(src, name, muts):
    with tempfile.TemporaryDirectory() as td:
        d = os.path.join(td, "s")
        shutil.copytree(src, d, symlinks=True)
        p = os.path.join(d, name)
        if os.path.exists(p):
            _mutate(p, muts)
        t0 = time.monotonic()
        _exercise(d)
        assert time.monotonic() - t0 < 5


@pytest.fixture(scope="module")
def synthetic_chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzzsyn")
    a = make_set(
        str(base / "a"),
        [(BASE, 6, ci.PE_PRESENT | ci.PE_LAZY), (BASE + 8 * PS, 3, ci.PE_PRESENT)],
        pages_of(9, 5).tobytes(),
    )
    make_set(str(base / "b"), [(BASE, 2, ci.PE_PARENT), (BASE + 2 * PS, 1, ci.PE_PRESENT),
                               (BASE + 3 * PS, 3, ci.PE_PARENT), (BASE + 8 * PS, 4, ci.PE_PRESENT)],
             pages_of(5, 6).tobytes(), parent=a)
    return str(base / "b")


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.sampled_from(["pagemap-1.img", "mm-1.img", "inventory.img", "pstree.img",
                             "parent/pagemap-1.img", "pages-7.img"]),
       muts=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_synthetic_chain(synthetic_chain, name, muts):
    if name.startswith("parent/"):
        # Mutate the parent through a private copy of the whole chain.
        with tempfile.TemporaryDirectory() as td:
            src = os.path.dirname(synthetic_chain)
            shutil.copytree(src, os.path.join(td, "c"), symlinks=True)
            _mutate(os.path.join(td, "c", "a", "pagemap-1.img"), muts)
            _exercise(os.path.join(td, "c", "b"))
        return
    _fuzz_one(synthetic_chain, name, muts)


@pytest.fixture(scope="module")
def real_dump(tmp_path_factory):
    require(have_root(), "real CRIU images need root")
    require(criu.check().ok, "needs a working CRIU")
    from statesync.testing import workloads
    d = tmp_path_factory.mktemp("fuzzreal")
    wl = workloads.spawn("1M", 0, own_pidns=True, paused=True)
    try:
        criu.dump(wl.pid, d / "full", leave_running=True)
    finally:
        wl.kill()
    return str(d / "full")


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.sampled_from(["pagemap-1.img", "mm-1.img", "inventory.img", "pstree.img"]),
       muts=st.lists(_mutation, min_size=1, max_size=3))
def test_fuzz_real_criu_images(real_dump, name, muts):
    _fuzz_one(real_dump, name, muts)


# --------------------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "statesync", "criu", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_info_diff_incremental(two_sets, tmp_path):
    a, b, old, new = two_sets
    r = _cli("diff", a, b, "--list")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("4 of 21 pages differ")
    assert f"{BASE + 11 * PS:#x}" in r.stdout
    r = _cli("incremental", b, "--parent", a, "-o", str(tmp_path / "inc"))
    assert r.returncode == 0 and "4 pages stored, 17 in parent" in r.stdout
    r = _cli("info", str(tmp_path / "inc"))
    assert r.returncode == 0 and "21 pages" in r.stdout and str(tmp_path / "a") in r.stdout
    r = _cli("info", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no such directory" in r.stderr   # a usage error (cli exit table)


def test_over_long_varints_stay_64_bit(tmp_path):
    # A VMA whose pgoff is a 10-byte varint with bits above 2**64 set.
    d = make_set(str(tmp_path / "s"), [(BASE, 1, ci.PE_PRESENT)], pages_of(1, 1).tobytes(), vmas=[])
    vma = _msg((1, BASE), (2, BASE + PS)) + b"\x18" + b"\xff" * 9 + b"\x7f"
    open(os.path.join(d, "mm-1.img"), "wb").write(_img(ci.MM_MAGIC, [_len_field(14, vma)]))
    v = criu.ImageSet(d).vmas()
    assert v["pgoff"].tolist() == [2**64 - 1]
