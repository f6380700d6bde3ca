/*
 * Two ways to fill 1 GiB of userfaultfd-registered transparent-huge-page
 * memory with data and end with huge pages, 2 MiB at a time, on this machine:
 *
 *   move:     copy the 2 MiB into a fresh huge-page stage (private,
 *             2 MiB-aligned, MADV_HUGEPAGE), then UFFDIO_MOVE it in: one PMD
 *             moves (ringfault's whole installs, design.md "Whole huge pages");
 *   collapse: UFFDIO_COPY in 256 KiB calls (4 KiB pages), then MADV_COLLAPSE
 *             (ringfault's HugeKeeper, the fallback).
 *
 * It checks every byte and the AnonHugePages gained. Linux 6.8+ (MOVE).
 * Measure with host free-page reporting off and memory warmed (benches/quiet.sh).
 *
 *   gcc -O2 -o /tmp/thp_install benches/floor/thp_install.c
 *   benches/quiet.sh /tmp/thp_install
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#define FEATURE_MOVE (1ULL << 16)
struct move_arg {
    uint64_t dst, src, len, mode;
    int64_t move;
};
#define IOCTL_MOVE _IOWR(UFFDIO, 0x05, struct move_arg)
#define HUGE (2UL << 20)
#define SIZE (1UL << 30)

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static char *aligned_map(size_t len)
{
    char *p = mmap(0, len + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    p = (char *)(((uintptr_t)p + HUGE - 1) & ~(HUGE - 1));
    madvise(p, len, MADV_HUGEPAGE);
    return p;
}

static long anon_huge_kib(void)
{
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    long v = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "AnonHugePages:", 14))
            v = atol(line + 14);
    if (f)
        fclose(f);
    return v;
}

static int registered(char *g)
{
    int u = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API, .features = FEATURE_MOVE};
    if (u < 0 || ioctl(u, UFFDIO_API, &api)) {
        perror("userfaultfd with MOVE");
        exit(1);
    }
    struct uffdio_register r = {.range = {(uintptr_t)g, SIZE}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(u, UFFDIO_REGISTER, &r)) {
        perror("UFFDIO_REGISTER");
        exit(1);
    }
    return u;
}

static int same(const char *g, const char *src)
{
    for (size_t o = 0; o < SIZE; o += HUGE)
        if (memcmp(g + o, src, HUGE))
            return 0;
    return 1;
}

int main(void)
{
    char *src = aligned_map(HUGE);
    for (size_t i = 0; i < HUGE; i++)
        src[i] = (char)(i * 7 + 3);
    for (int rep = 0; rep < 3; rep++) {
        char *g = aligned_map(SIZE);
        int u = registered(g);
        char *stage = aligned_map(HUGE);
        long h0 = anon_huge_kib();
        double t0 = now(), moving = 0;
        for (size_t o = 0; o < SIZE; o += HUGE) {
            memcpy(stage, src, HUGE);
            double a = now();
            struct move_arg m = {(uintptr_t)g + o, (uintptr_t)stage, HUGE, 0, 0};
            if (ioctl(u, IOCTL_MOVE, &m)) {
                perror("UFFDIO_MOVE");
                exit(1);
            }
            moving += now() - a;
        }
        double t1 = now();
        printf("move:     %.3f s (%.2f GB/s), of which UFFDIO_MOVE %.3f s; +%ld MiB huge; bytes %s\n",
               t1 - t0, SIZE / (t1 - t0) / 1e9, moving, (anon_huge_kib() - h0) >> 10,
               same(g, src) ? "ok" : "WRONG");
        close(u);
        munmap(g, SIZE);

        g = aligned_map(SIZE);
        u = registered(g);
        h0 = anon_huge_kib();
        double c0 = now(), collapsing = 0;
        for (size_t o = 0; o < SIZE; o += HUGE) {
            for (size_t k = 0; k < HUGE; k += 256 << 10) {
                struct uffdio_copy c = {(uintptr_t)g + o + k, (uintptr_t)src + k, 256 << 10, 0, 0};
                if (ioctl(u, UFFDIO_COPY, &c)) {
                    perror("UFFDIO_COPY");
                    exit(1);
                }
            }
            double a = now();
            if (madvise(g + o, HUGE, MADV_COLLAPSE))
                perror("MADV_COLLAPSE");
            collapsing += now() - a;
        }
        double c1 = now();
        printf("collapse: %.3f s (%.2f GB/s), of which MADV_COLLAPSE %.3f s; +%ld MiB huge; bytes %s\n",
               c1 - c0, SIZE / (c1 - c0) / 1e9, collapsing, (anon_huge_kib() - h0) >> 10,
               same(g, src) ? "ok" : "WRONG");
        close(u);
        munmap(g, SIZE);
    }
    return 0;
}
