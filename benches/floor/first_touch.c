/*
 * What memory the host has not backed costs on this nested machine: five
 * rounds of touching 1 GiB of transparent huge pages, then six rounds of
 * collapsing 1 GiB of 4 KiB pages into huge pages (MADV_COLLAPSE), each round
 * on memory freed by the one before. With host free-page reporting on, freed
 * memory goes back to the host, so run it right after turning reporting off:
 * the first round of each kind then gets never-backed memory, the later ones
 * memory the host has backed since. docs/results.md (issue 8) explains why
 * benchmarks touch free memory once first (benches/quiet.sh).
 *
 *   gcc -O2 -o /tmp/first_touch benches/floor/first_touch.c
 *   echo 11 > /sys/module/page_reporting/parameters/page_reporting_order
 *   /tmp/first_touch
 *   echo 9 > /sys/module/page_reporting/parameters/page_reporting_order
 */
#define _GNU_SOURCE
#include "floor.h"

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#define SIZE (1UL << 30)

int main(void)
{
    char *raw;
    for (int r = 0; r < 5; r++) {
        char *p = aligned_map(SIZE, MADV_HUGEPAGE, &raw);
        double t = now();
        for (size_t o = 0; o < SIZE; o += 4096)
            p[o] = 1;
        double s = now() - t;
        printf("touch 1 GiB of huge pages, round %d: %.3f s (%.2f GB/s)\n", r, s, SIZE / s / 1e9);
        munmap(raw, SIZE + HUGE);
    }
    for (int r = 0; r < 6; r++) {
        char *p = aligned_map(SIZE, MADV_NOHUGEPAGE, &raw);
        for (size_t o = 0; o < SIZE; o += 4096)
            p[o] = 1;
        madvise(p, SIZE, MADV_HUGEPAGE);
        int failed = 0;
        double t = now();
        for (size_t o = 0; o < SIZE; o += HUGE)
            failed += madvise(p + o, HUGE, MADV_COLLAPSE) != 0;
        double s = now() - t;
        printf("collapse 1 GiB of 4 KiB pages, round %d: %.3f s (%.2f GB/s), %d ranges refused\n", r, s,
               SIZE / s / 1e9, failed);
        munmap(raw, SIZE + HUGE);
    }
    return 0;
}
