/* userfaultfd async write-protect and PAGEMAP_SCAN. See ss_uffd.h.
 *
 * Debian 12's kernel headers predate PAGEMAP_SCAN (Linux 6.7) and
 * UFFD_FEATURE_WP_ASYNC (6.7); the uapi definitions we need are carried here
 * under #ifndef so newer headers win. */
#include "ss_uffd.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef __NR_userfaultfd
#define __NR_userfaultfd 323
#endif

#ifndef PAGEMAP_SCAN
struct page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

struct pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

/* Regions per PAGEMAP_SCAN call in ss_scan_written (24 KiB on the stack). */
#define SS_SCAN_REGIONS 1024

int ss_uffd_create(int flags)
{
    long fd = syscall(__NR_userfaultfd, flags);
    return fd < 0 ? -errno : (int)fd;
}

int ss_uffd_api(int uffd, uint64_t features, uint64_t *got)
{
    struct uffdio_api api;
    memset(&api, 0, sizeof api);
    api.api = UFFD_API;
    api.features = features;
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        return -errno;
    if (got)
        *got = api.features;
    return 0;
}

int ss_uffd_register_wp(int uffd, uint64_t start, uint64_t len)
{
    struct uffdio_register reg;
    memset(&reg, 0, sizeof reg);
    reg.range.start = start;
    reg.range.len = len;
    reg.mode = UFFDIO_REGISTER_MODE_WP;
    return ioctl(uffd, UFFDIO_REGISTER, &reg) < 0 ? -errno : 0;
}

int ss_uffd_unregister(int uffd, uint64_t start, uint64_t len)
{
    struct uffdio_range r = {.start = start, .len = len};
    return ioctl(uffd, UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

ssize_t ss_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
                        uint64_t category_mask, uint64_t inverted, uint64_t anyof_mask,
                        uint64_t return_mask,
                        uint64_t max_pages, uint64_t *regions, size_t nregions,
                        uint64_t *walk_end)
{
    struct pm_scan_arg arg;
    memset(&arg, 0, sizeof arg);
    arg.size = sizeof arg;
    arg.flags = flags;
    arg.start = start;
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)regions;
    arg.vec_len = regions ? nregions : 0;
    arg.max_pages = max_pages;
    arg.category_mask = category_mask;
    arg.category_inverted = inverted;
    arg.category_anyof_mask = anyof_mask;
    arg.return_mask = return_mask;
    int r;
    do {
        r = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
    } while (r < 0 && errno == EINTR);
    if (walk_end)
        *walk_end = arg.walk_end;
    return r < 0 ? -errno : r;
}

ssize_t ss_scan_written(int pagemap_fd, uint64_t start, uint64_t end, size_t page_size,
                        uint64_t scan_flags, uint64_t *out, size_t cap, uint64_t *walk_end,
                        size_t *stored)
{
    struct page_region regs[SS_SCAN_REGIONS];
    size_t n = 0;
    uint64_t addr = start;
    if (stored)
        *stored = 0;
    if (page_size == 0 || start % page_size || end % page_size || end < start)
        return -EINVAL;
    if (!out) {
        /* Arm only: write-protect every page, report nothing. */
        uint64_t we = start;
        ssize_t r = ss_pagemap_scan(pagemap_fd, start, end, scan_flags, SS_PAGE_IS_WRITTEN, 0,
                                    0, SS_PAGE_IS_WRITTEN, 0, NULL, 0, &we);
        if (walk_end)
            *walk_end = we;
        return r < 0 ? r : 0;
    }
    while (addr < end && n < cap) {
        /* The kernel fills the region array up to the first error; zero it so
         * the regions it did report can be counted even when the call fails. */
        memset(regs, 0, sizeof regs);
        uint64_t we = 0;
        ssize_t r = ss_pagemap_scan(pagemap_fd, addr, end, scan_flags, SS_PAGE_IS_WRITTEN, 0,
                                    0, SS_PAGE_IS_WRITTEN, cap - n, (uint64_t *)regs,
                                    SS_SCAN_REGIONS, &we);
        size_t nreg = 0;
        if (r >= 0) {
            nreg = (size_t)r;
        } else {
            while (nreg < SS_SCAN_REGIONS && regs[nreg].end > regs[nreg].start)
                nreg++;
        }
        for (size_t i = 0; i < nreg && n < cap; i++)
            for (uint64_t a = regs[i].start; a < regs[i].end && n < cap; a += page_size)
                out[n++] = a;
        if (r < 0) {
            if (stored)
                *stored = n;
            if (walk_end)
                *walk_end = we ? we : addr;
            return r;
        }
        if (we <= addr)
            break; /* no progress: cannot happen, but never loop forever */
        addr = we;
    }
    if (stored)
        *stored = n;
    if (walk_end)
        *walk_end = addr < end ? addr : end;
    return (ssize_t)n;
}
