"""Constants of the machine that every core module shares (no imports of test code)."""
from __future__ import annotations

import mmap

#: Bytes per page of this kernel (4096 on x86_64). Page addresses, pagemap offsets
#: and image page files are all in units of this.
PAGE_SIZE = mmap.PAGESIZE
