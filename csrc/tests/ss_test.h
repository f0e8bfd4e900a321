/* Minimal check macros for the C core's own tests (run under ASan by tests/test_c_asan.py). */
#ifndef SS_TEST_H
#define SS_TEST_H
#include <stdio.h>
#include <stdlib.h>

static int ss_test_failures;
#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            ss_test_failures++;                                                     \
        }                                                                           \
    } while (0)
#define TEST_DONE()                                                                 \
    do {                                                                            \
        if (ss_test_failures) {                                                     \
            fprintf(stderr, "%d check(s) failed\n", ss_test_failures);              \
            return 1;                                                               \
        }                                                                           \
        printf("ok\n");                                                             \
        return 0;                                                                   \
    } while (0)
#endif
