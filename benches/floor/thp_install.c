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
#include "floor.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
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
#define SIZE (1UL << 30)

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

/* 1 GiB of THP guest memory, registered for missing faults. */
struct target {
    char *g, *raw;
    int uffd;
    long huge_kib;
    double started;
};

static struct target open_target(void)
{
    struct target t;
    t.g = aligned_map(SIZE, MADV_HUGEPAGE, &t.raw);
    t.uffd = registered(t.g);
    t.huge_kib = anon_huge_kib();
    t.started = now();
    return t;
}

/* Prints how `how` did (`part` of it spent in `part_s`), checks the bytes,
 * and unmaps the target. */
static void close_target(struct target *t, const char *how, const char *part, double part_s,
                         const char *src)
{
    double s = now() - t->started;
    printf("%-9s %.3f s (%.2f GB/s), of which %s %.3f s; +%ld MiB huge; bytes %s\n", how, s,
           SIZE / s / 1e9, part, part_s, (anon_huge_kib() - t->huge_kib) >> 10,
           same(t->g, src) ? "ok" : "WRONG");
    close(t->uffd);
    munmap(t->raw, SIZE + HUGE);
}

int main(void)
{
    char *raw;
    char *src = aligned_map(HUGE, MADV_HUGEPAGE, &raw);
    for (size_t i = 0; i < HUGE; i++)
        src[i] = (char)(i * 7 + 3);
    char *stage = aligned_map(HUGE, MADV_HUGEPAGE, &raw);
    for (int rep = 0; rep < 3; rep++) {
        struct target t = open_target();
        double moving = 0;
        for (size_t o = 0; o < SIZE; o += HUGE) {
            memcpy(stage, src, HUGE);
            double a = now();
            struct move_arg m = {(uintptr_t)t.g + o, (uintptr_t)stage, HUGE, 0, 0};
            if (ioctl(t.uffd, IOCTL_MOVE, &m)) {
                perror("UFFDIO_MOVE");
                exit(1);
            }
            moving += now() - a;
        }
        close_target(&t, "move:", "UFFDIO_MOVE", moving, src);

        t = open_target();
        double collapsing = 0;
        for (size_t o = 0; o < SIZE; o += HUGE) {
            for (size_t k = 0; k < HUGE; k += 256 << 10) {
                struct uffdio_copy c = {(uintptr_t)t.g + o + k, (uintptr_t)src + k, 256 << 10, 0, 0};
                if (ioctl(t.uffd, UFFDIO_COPY, &c)) {
                    perror("UFFDIO_COPY");
                    exit(1);
                }
            }
            double a = now();
            if (madvise(t.g + o, HUGE, MADV_COLLAPSE))
                perror("MADV_COLLAPSE");
            collapsing += now() - a;
        }
        close_target(&t, "collapse:", "MADV_COLLAPSE", collapsing, src);
    }
    return 0;
}
