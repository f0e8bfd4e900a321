/* ss_proc.c on our own process: pagemap reads, selection, page reads that go
 * on past unmapped pages, remote hashing. Run under ASan by tests/test_c_asan.py. */
#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ss_hash.h"
#include "ss_proc.h"
#include "ss_test.h"

int main(void)
{
    const size_t ps = (size_t)sysconf(_SC_PAGESIZE);
    const size_t n = 64;
    uint8_t *buf = mmap(NULL, n * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(buf != MAP_FAILED);
    for (size_t i = 0; i < n; i += 3)
        buf[i * ps] = (uint8_t)(i + 1);
    uint64_t base = (uint64_t)(uintptr_t)buf;

    int fd = ss_pagemap_open(getpid());
    CHECK(fd >= 0);
    uint64_t ent[64];
    CHECK(ss_pagemap_read(fd, base, n, ps, ent) == (ssize_t)n);
    for (size_t i = 0; i < n; i++)
        CHECK(!!(ent[i] & SS_PM_PRESENT) == (i % 3 == 0));
    CHECK(ss_pagemap_read(fd, base + 1, 1, ps, ent) == -EINVAL);

    /* selection with a small output buffer resumes exactly */
    uint64_t sel[5], addrs0[64], next = 0, cur = base;
    size_t total = 0;
    while (cur < base + n * ps) {
        ssize_t r = ss_pagemap_select(fd, cur, base + n * ps, ps, SS_PM_PRESENT, sel, 5, &next);
        CHECK(r >= 0);
        for (ssize_t k = 0; k < r; k++)
            CHECK(sel[k] == base + (total + (size_t)k) * 3 * ps);
        total += (size_t)r;
        CHECK(next > cur);
        cur = next;
    }
    CHECK(total == (n + 2) / 3);
    /* exclude: anonymous private pages never carry SS_PM_FILE, present ones always
     * carry SS_PM_PRESENT */
    CHECK(ss_pagemap_select_ex(fd, base, base + n * ps, ps, SS_PM_PRESENT, SS_PM_FILE, addrs0,
                               64, &next) == (ssize_t)((n + 2) / 3));
    CHECK(next == base + n * ps && addrs0[1] == base + 3 * ps);
    CHECK(ss_pagemap_select_ex(fd, base, base + n * ps, ps, SS_PM_PRESENT, SS_PM_PRESENT, addrs0,
                               64, &next) == 0);
    close(fd);

    /* read with holes: unmap pages 10-11 and 40 */
    CHECK(munmap(buf + 10 * ps, 2 * ps) == 0);
    CHECK(munmap(buf + 40 * ps, ps) == 0);
    uint64_t addrs[64];
    for (size_t i = 0; i < n; i++)
        addrs[i] = base + i * ps;
    uint8_t *out = malloc(n * ps), ok[64];
    memset(ok, 7, sizeof ok);
    ssize_t got = ss_read_pages(getpid(), addrs, n, ps, out, ok);
    CHECK(got == (ssize_t)n - 3);
    for (size_t i = 0; i < n; i++) {
        int hole = i == 10 || i == 11 || i == 40;
        CHECK(ok[i] == !hole);
        if (!hole)
            CHECK(memcmp(out + i * ps, buf + i * ps, ps) == 0);
        else
            CHECK(out[i * ps] == 0 && out[i * ps + ps - 1] == 0);
    }
    uint64_t h[128], h2[128];
    CHECK(ss_hash_remote(getpid(), addrs, n, ps, 5, h, ok) == (ssize_t)n - 3);
    ss_hash_pages(out, n, ps, 5, h2);
    for (size_t i = 0; i < n; i++)
        if (ok[i])
            CHECK(h[2 * i] == h2[2 * i] && h[2 * i + 1] == h2[2 * i + 1]);
    CHECK(ss_read_pages(getpid(), addrs, 1, ps, out, ok) == 1);
    addrs[0] += 1;
    CHECK(ss_read_pages(getpid(), addrs, 1, ps, out, ok) == -EINVAL);
    CHECK(ss_read_pages(0x7fffffff, addrs, 0, ps, out, ok) == 0 ||
          ss_read_pages(0x7fffffff, addrs, 0, ps, out, ok) == -ESRCH);
    free(out);
    munmap(buf, n * ps);
    TEST_DONE();
}
