/* userfaultfd write-protect (async mode) and the PAGEMAP_SCAN ioctl: exact
 * dirty-page tracking without soft-dirty bits (Linux >= 6.7).
 *
 * The userfaultfd context is bound to the mm of the process that created it,
 * not to the caller: a descriptor created inside a target (see ss_ptrace.h) and
 * taken with pidfd_getfd can be initialised, registered and scanned from here.
 * In WP_ASYNC mode a write to a write-protected page never blocks: the kernel
 * clears the page's uffd-wp bit and lets the write go on. PAGEMAP_SCAN with
 * PM_SCAN_WP_MATCHING then reports the pages whose bit is clear ("written") and
 * sets it again, in one atomic pass under the mm lock.
 *
 * All functions return 0 / a count, or -errno; none keeps state.
 */
#ifndef SS_UFFD_H
#define SS_UFFD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* PAGE_IS_* categories of PAGEMAP_SCAN (uapi linux/fs.h, Linux 6.7). */
#define SS_PAGE_IS_WPALLOWED (1ull << 0)
#define SS_PAGE_IS_WRITTEN   (1ull << 1)
#define SS_PAGE_IS_FILE      (1ull << 2)
#define SS_PAGE_IS_PRESENT   (1ull << 3)
#define SS_PAGE_IS_SWAPPED   (1ull << 4)
#define SS_PAGE_IS_PFNZERO   (1ull << 5)
#define SS_PAGE_IS_HUGE      (1ull << 6)
#define SS_PAGE_IS_SOFTDIRTY (1ull << 7)

/* PAGEMAP_SCAN flags. */
#define SS_PM_SCAN_WP_MATCHING  (1ull << 0)
#define SS_PM_SCAN_CHECK_WPASYNC (1ull << 1)

/* userfaultfd(2) flag and features (uapi linux/userfaultfd.h). */
#define SS_UFFD_USER_MODE_ONLY 1
#define SS_UFFD_FEATURE_WP_UNPOPULATED (1ull << 13)
#define SS_UFFD_FEATURE_WP_ASYNC (1ull << 15)

/* Create a userfaultfd in the calling process (flags: O_CLOEXEC, O_NONBLOCK,
 * SS_UFFD_USER_MODE_ONLY). Returns the fd or -errno. */
int ss_uffd_create(int flags);

/* UFFDIO_API handshake requesting features; *got receives the features the
 * kernel reports (may be NULL). */
int ss_uffd_api(int uffd, uint64_t features, uint64_t *got);

/* UFFDIO_REGISTER [start, start+len) in write-protect mode. -EINVAL means the
 * kernel refuses this kind of VMA (file-backed private, VM_PFNMAP ...);
 * -EBUSY that another userfaultfd already owns it. */
int ss_uffd_register_wp(int uffd, uint64_t start, uint64_t len);

/* UFFDIO_UNREGISTER [start, start+len): clears the uffd-wp bits and markers
 * of the range and detaches it from the context. */
int ss_uffd_unregister(int uffd, uint64_t start, uint64_t len);

/* One PAGEMAP_SCAN of [start, end) on pagemap_fd (any process's pagemap),
 * asking for PAGE_IS_WRITTEN pages with scan_flags (SS_PM_SCAN_*). With
 * SS_PM_SCAN_WP_MATCHING the reported pages are write-protected again in the
 * same pass. Page addresses are written to out (at most cap; the scan stops
 * there, *walk_end tells where, the rest stays untouched for the next call).
 * With out == NULL and cap == 0 the scan only arms (write-protects) the range.
 *
 * Returns the number of page addresses stored, or -errno. On -EPERM (a VMA in
 * the range is not registered in async WP mode, with CHECK_WPASYNC) the pages
 * already reported before the failing VMA are still stored: *stored receives
 * their count and *walk_end where the walk stopped, so nothing is lost. */
ssize_t ss_scan_written(int pagemap_fd, uint64_t start, uint64_t end, size_t page_size,
                        uint64_t scan_flags, uint64_t *out, size_t cap, uint64_t *walk_end,
                        size_t *stored);

/* A general PAGEMAP_SCAN: regions (start, end, categories) of pages matching
 * category_mask (all of, after XOR with inverted) / anyof_mask (any of),
 * reporting return_mask; max_pages 0 = no limit.
 * regions holds 3*nregions words. Returns the number of regions or -errno. */
ssize_t ss_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
                        uint64_t category_mask, uint64_t inverted, uint64_t anyof_mask,
                        uint64_t return_mask,
                        uint64_t max_pages, uint64_t *regions, size_t nregions,
                        uint64_t *walk_end);

#endif
