/* Reading another process's pagemap and page contents. See ss_proc.h. */
#include "ss_proc.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ss_hash.h"

/* process_vm_readv accepts at most IOV_MAX (1024) iovecs per side. */
#define SS_RV_IOV 1024
/* Pagemap entries read per pread in ss_pagemap_select (32 KiB on the stack). */
#define SS_PM_CHUNK 4096
/* Pages per batch in ss_hash_remote: 256 KiB stays in L2 between the copy and
 * the hash (measured: 64 pages beat 256 and 1024 here). */
#define SS_HASH_BATCH 64

int ss_pagemap_open(int pid)
{
    char path[64];
    if (pid <= 0)
        return -EINVAL;
    snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

ssize_t ss_pagemap_read(int fd, uint64_t start, size_t npages, size_t page_size, uint64_t *out)
{
    if (page_size == 0 || (start % page_size) != 0)
        return -EINVAL;
    uint64_t first = start / page_size;
    if (first > (uint64_t)LLONG_MAX / 8)
        return -EINVAL;
    size_t done = 0;
    while (done < npages) {
        size_t want = npages - done;
        if (want > (SIZE_MAX / 8) || want * 8 > (size_t)1 << 30)
            want = ((size_t)1 << 30) / 8;
        ssize_t r = pread(fd, out + done, want * 8, (off_t)((first + done) * 8));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            break; /* end of the address space */
        done += (size_t)r / 8;
        if ((size_t)r % 8)
            return -EIO; /* pagemap always returns whole entries */
    }
    return (ssize_t)done;
}

ssize_t ss_pagemap_select(int fd, uint64_t start, uint64_t end, size_t page_size, uint64_t mask,
                          uint64_t *out, size_t cap, uint64_t *next)
{
    return ss_pagemap_select_ex(fd, start, end, page_size, mask, 0, out, cap, next);
}

ssize_t ss_pagemap_select_ex(int fd, uint64_t start, uint64_t end, size_t page_size,
                             uint64_t mask, uint64_t exclude, uint64_t *out, size_t cap,
                             uint64_t *next)
{
    uint64_t buf[SS_PM_CHUNK];
    if (page_size == 0 || start % page_size || end % page_size || end < start)
        return -EINVAL;
    size_t n = 0;
    uint64_t addr = start;
    while (addr < end && n < cap) {
        uint64_t left = (end - addr) / page_size;
        size_t want = left < SS_PM_CHUNK ? (size_t)left : SS_PM_CHUNK;
        /* Never read entries we could not store: resuming at *next stays exact. */
        if (want > cap - n && cap - n < SS_PM_CHUNK)
            want = cap - n;
        ssize_t got = ss_pagemap_read(fd, addr, want, page_size, buf);
        if (got < 0)
            return got;
        if (got == 0) {
            addr = end;
            break;
        }
        for (ssize_t i = 0; i < got; i++) {
            if (!(buf[i] & mask) || (buf[i] & exclude & ~SS_PM_MARKER))
                continue;
            /* A PTE marker (a uffd-wp marker on a never-populated page, a guard
             * region) shows as "swapped" with swap type 31 (SWP_PTE_MARKER: the last
             * of the 5-bit types) when the reader may see swap entries (CAP_SYS_ADMIN).
             * It holds no memory. */
            if ((exclude & SS_PM_MARKER) && (buf[i] & (1ULL << 62)) &&
                !(buf[i] & (1ULL << 63)) && (buf[i] & 0x1f) == 0x1f)
                continue;
            out[n++] = addr + (uint64_t)i * page_size;
        }
        addr += (uint64_t)got * page_size;
    }
    if (next)
        *next = addr < end ? addr : end;
    return (ssize_t)n;
}

/* One process_vm_readv over pages [i, i+k) of addrs, contiguous runs merged into
 * one remote iovec. Returns bytes read or -errno. */
static ssize_t read_batch(int pid, const uint64_t *addrs, size_t k, size_t ps, uint8_t *dst,
                          size_t *pages_in)
{
    struct iovec remote[SS_RV_IOV];
    size_t nr = 0, used = 0;
    while (used < k) {
        if (nr > 0 && addrs[used] == (uint64_t)(uintptr_t)remote[nr - 1].iov_base +
                                          remote[nr - 1].iov_len) {
            remote[nr - 1].iov_len += ps;
        } else {
            if (nr == SS_RV_IOV)
                break;
            remote[nr].iov_base = (void *)(uintptr_t)addrs[used];
            remote[nr].iov_len = ps;
            nr++;
        }
        used++;
    }
    struct iovec local = {.iov_base = dst, .iov_len = used * ps};
    *pages_in = used;
    ssize_t r;
    do {
        r = process_vm_readv(pid, &local, 1, remote, nr, 0);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

/* Reads pages [0, n) into out, marking ok; shared by the copy and hash paths. */
static ssize_t read_into(int pid, const uint64_t *addrs, size_t n, size_t ps, uint8_t *out,
                         uint8_t *ok)
{
    size_t i = 0, good = 0;
    while (i < n) {
        size_t k = 0;
        ssize_t r = read_batch(pid, addrs + i, n - i, ps, out + i * ps, &k);
        size_t full;
        if (r < 0) {
            if (r != -EFAULT && r != -ENOMEM && r != -EIO)
                return r; /* ESRCH (gone), EPERM (no rights), EINVAL: a real error */
            full = 0;     /* the first page itself failed */
        } else {
            full = (size_t)r / ps;
        }
        for (size_t j = 0; j < full; j++)
            ok[i + j] = 1;
        good += full;
        i += full;
        if (full < k) {
            /* process_vm_readv stopped at page i: it vanished or is unreadable. */
            memset(out + i * ps, 0, ps);
            ok[i] = 0;
            i++;
        }
    }
    return (ssize_t)good;
}

ssize_t ss_read_pages(int pid, const uint64_t *addrs, size_t n, size_t page_size, uint8_t *out,
                      uint8_t *ok)
{
    if (page_size == 0 || pid <= 0)
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if (addrs[i] % page_size)
            return -EINVAL;
    return read_into(pid, addrs, n, page_size, out, ok);
}

ssize_t ss_hash_remote(int pid, const uint64_t *addrs, size_t n, size_t page_size, uint64_t seed,
                       uint64_t *hashes, uint8_t *ok)
{
    if (page_size == 0 || pid <= 0)
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if (addrs[i] % page_size)
            return -EINVAL;
    uint8_t *buf = malloc(SS_HASH_BATCH * page_size);
    if (!buf)
        return -ENOMEM;
    size_t good = 0;
    for (size_t i = 0; i < n; i += SS_HASH_BATCH) {
        size_t k = n - i < SS_HASH_BATCH ? n - i : SS_HASH_BATCH;
        ssize_t r = read_into(pid, addrs + i, k, page_size, buf, ok + i);
        if (r < 0) {
            free(buf);
            return r;
        }
        good += (size_t)r;
        ss_hash_pages(buf, k, page_size, seed, hashes + 2 * i);
        for (size_t j = 0; j < k; j++)
            if (!ok[i + j])
                hashes[2 * (i + j)] = hashes[2 * (i + j) + 1] = 0;
    }
    free(buf);
    return (ssize_t)good;
}
