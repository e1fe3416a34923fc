"""References between file, handle and mapping; cyclic GC; deallocation."""

import gc
import weakref

from conftest import PS, DataFile


def test_vma_keeps_fileh_and_file_alive():
    f = DataFile()
    fh = f.fileh_open()
    vma = fh.mmap(0, 1)
    rf, rfh = weakref.ref(f), weakref.ref(fh)
    del f, fh
    gc.collect()
    assert rf() is not None and rfh() is not None
    assert memoryview(vma)[0] == 0, "loadblk still reachable"
    del vma
    gc.collect()
    assert rf() is None and rfh() is None


def test_fileh_keeps_file_alive():
    f = DataFile()
    fh = f.fileh_open()
    rf = weakref.ref(f)
    del f
    gc.collect()
    assert rf() is not None
    del fh
    gc.collect()
    assert rf() is None


def test_cycle_file_holds_its_handle_is_collected():
    f = DataFile()
    f.fh = f.fileh_open()
    rf, rfh = weakref.ref(f), weakref.ref(f.fh)
    del f
    gc.collect()
    assert rf() is None and rfh() is None


def test_cycle_file_holds_a_vma_is_collected():
    f = DataFile()
    f.vma = f.fileh_open().mmap(0, 2)
    memoryview(f.vma)[PS] = 3
    rf, rv = weakref.ref(f), weakref.ref(f.vma)
    del f
    gc.collect()
    assert rf() is None and rv() is None


def test_cycle_through_memoryview_is_collected():
    # (numpy arrays do not take part in cyclic GC, so a cycle through one
    # is never collected, with or without bigfile.)
    f = DataFile()
    f.m = memoryview(f.fileh_open().mmap(0, 1))
    assert f.m[0] == 0
    rf = weakref.ref(f)
    del f
    gc.collect()
    assert rf() is None


def test_vma_dealloc_with_gc_in_weakref_callback():
    f = DataFile()
    fh = f.fileh_open()
    vma = fh.mmap(0, 1)
    memoryview(vma)[0]
    called = []

    def cb(_):
        called.append(1)
        # Garbage with a cycle, then a full collection, from inside the
        # VMA's deallocation.
        junk = []
        junk.append(junk)
        gc.collect()

    r = weakref.ref(vma, cb)
    del vma
    gc.collect()
    assert called == [1]
    assert r() is None
    assert fh.mmap(0, 1) is not None




def test_closed_fileh_cycle_and_unmapped_vma_collected():
    f = DataFile()
    with f.fileh_open() as fh:
        f.fh = fh
    rf = weakref.ref(f)
    del f, fh
    gc.collect()
    assert rf() is None


def test_many_vmas_dropped_under_gc_pressure():
    f = DataFile()
    fh = f.fileh_open()
    holders = []
    for i in range(64):
        h = [fh.mmap(i, 1)]
        h.append(h)  # cycle: freed by the collector, not by refcount
        memoryview(h[0])[0]
        holders.append(weakref.ref(h[0]))
        del h
        if i % 8 == 0:
            gc.collect()
    gc.collect()
    assert all(r() is None for r in holders)
    assert sorted(f.loads) == list(range(64))
