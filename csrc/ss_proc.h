/* Reading another process's memory map state and page contents.
 *
 * pagemap: /proc/PID/pagemap holds one little-endian uint64 per virtual page
 * (bit 63 present, 62 swapped, 61 file-page/shared-anon, 57 uffd-wp,
 * 56 exclusive, 55 soft-dirty, 0-54 PFN; the PFN reads as 0 without
 * CAP_SYS_ADMIN). Page contents are copied with process_vm_readv, which needs
 * PTRACE_MODE_ATTACH rights on the target and never changes it.
 *
 * Every function is thread-safe when its buffers are not shared; none keeps
 * state. Buffers belong to the caller.
 */
#ifndef SS_PROC_H
#define SS_PROC_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define SS_PM_PRESENT   (1ull << 63)
#define SS_PM_SWAPPED   (1ull << 62)
#define SS_PM_FILE      (1ull << 61)
#define SS_PM_UFFD_WP   (1ull << 57)
#define SS_PM_EXCLUSIVE (1ull << 56)
#define SS_PM_SOFTDIRTY (1ull << 55)
#define SS_PM_PFN_MASK  ((1ull << 55) - 1)

/* Open /proc/PID/pagemap read-only. Returns the fd or -errno. */
int ss_pagemap_open(int pid);

/* Read the pagemap entries of npages pages starting at virtual address start
 * (page aligned) into out[0..npages). Returns the number of entries read
 * (fewer at the end of the address space) or -errno. */
ssize_t ss_pagemap_read(int fd, uint64_t start, size_t npages, size_t page_size, uint64_t *out);

/* Walk the pagemap of [start, end) and store the address of every page whose
 * entry has any bit of mask set into out (at most cap addresses, ascending).
 * *next receives the address where the walk stopped (end when complete), so a
 * caller resumes there with a fresh buffer. Returns the number stored or
 * -errno. Memory use is bounded whatever the range size. */
ssize_t ss_pagemap_select(int fd, uint64_t start, uint64_t end, size_t page_size, uint64_t mask,
                          uint64_t *out, size_t cap, uint64_t *next);

/* ss_pagemap_select, leaving out pages whose entry has any bit of exclude set
 * (SS_PM_FILE: page-cache pages of a file, which CRIU does not dump). */
/* In ss_pagemap_select_ex's exclude: leave out PTE markers (bit 60 of a pagemap
 * entry is always zero, so it is free to carry this request). */
#define SS_PM_MARKER (1ULL << 60)

ssize_t ss_pagemap_select_ex(int fd, uint64_t start, uint64_t end, size_t page_size,
                             uint64_t mask, uint64_t exclude, uint64_t *out, size_t cap,
                             uint64_t *next);

/* Copy n pages of process pid, at the page-aligned addresses addrs[0..n), into
 * out (n * page_size bytes). ok[i] is set to 1 when page i was read, 0 when it
 * could not be (unmapped or unreadable meanwhile: its bytes are zeroed).
 * Contiguous addresses are read in one iovec; process_vm_readv stops at the
 * first failing page, and the read resumes right after it.
 * Returns the number of pages read, or -errno (-ESRCH: the process is gone,
 * -EPERM: no ptrace rights). */
ssize_t ss_read_pages(int pid, const uint64_t *addrs, size_t n, size_t page_size, uint8_t *out,
                      uint8_t *ok);

/* Like ss_read_pages but hashes each page (ss_hash128, seed) into
 * hashes[2*i..2*i+1] instead of returning contents; works through a small
 * internal buffer so that memory use stays bounded. Unreadable pages get
 * ok[i] = 0 and a zero hash. Returns the number of pages hashed or -errno. */
ssize_t ss_hash_remote(int pid, const uint64_t *addrs, size_t n, size_t page_size, uint64_t seed,
                       uint64_t *hashes, uint8_t *ok);

#endif
