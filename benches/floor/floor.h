/*
 * What the C floors share: a monotonic clock, and 2 MiB-aligned private
 * anonymous mappings. Included by thp_install.c and first_touch.c (gcc finds
 * it beside them).
 */
#ifndef RINGFAULT_FLOOR_H
#define RINGFAULT_FLOOR_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define HUGE (2UL << 20)

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* `len` bytes, 2 MiB-aligned, with madvise `advice`; *raw and len + HUGE are
 * what to unmap. */
static char *aligned_map(size_t len, int advice, char **raw)
{
    char *p = mmap(0, len + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    *raw = p;
    p = (char *)(((uintptr_t)p + HUGE - 1) & ~(HUGE - 1));
    madvise(p, len, advice);
    return p;
}

#endif
