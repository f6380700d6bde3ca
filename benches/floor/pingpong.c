/*
 * The demand path's floor on this machine: a 40-byte request and a 4 KiB reply
 * over loopback TCP between two processes, blocking reads, each side pinned.
 * This is the network part of one demand fault without userfaultfd, used in
 * docs/results.md to show where ringfault's fault latency goes.
 *
 *   gcc -O2 -o /tmp/pingpong benches/floor/pingpong.c
 *   /tmp/pingpong SERVER_CORE CLIENT_CORE       e.g. 0 0 (same core), 0 1
 *   RT=1 /tmp/pingpong 0 0                      both sides SCHED_FIFO 10
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { ROUNDS = 20000, REQ = 40, PAGE = 4096 };

static void place(int core)
{
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(core, &s);
    sched_setaffinity(0, sizeof s, &s);
    if (getenv("RT")) {
        struct sched_param p = {.sched_priority = 10};
        sched_setscheduler(0, SCHED_FIFO, &p);
    }
}

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int read_full(int fd, char *b, int n)
{
    int got = 0;
    while (got < n) {
        int r = recv(fd, b + got, n - got, 0);
        if (r <= 0)
            return -1;
        got += r;
    }
    return got;
}

static int cmp(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s SERVER_CORE CLIENT_CORE\n", argv[0]);
        return 2;
    }
    int one = 1;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (void *)&a, sizeof a) || listen(l, 1)) {
        perror("listen");
        return 1;
    }
    socklen_t al = sizeof a;
    getsockname(l, (void *)&a, &al);
    pid_t child = fork();
    if (child == 0) {
        place(atoi(argv[1]));
        int s = accept(l, 0, 0);
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        char req[REQ], page[PAGE];
        memset(page, 1, sizeof page);
        while (read_full(s, req, REQ) == REQ)
            if (write(s, page, PAGE) != PAGE)
                break;
        _exit(0);
    }
    place(atoi(argv[2]));
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (void *)&a, sizeof a)) {
        perror("connect");
        return 1;
    }
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char req[REQ] = {0}, page[PAGE];
    static double lat[ROUNDS];
    for (int i = 0; i < ROUNDS; i++) {
        double t = now_us();
        if (write(c, req, REQ) != REQ || read_full(c, page, PAGE) != PAGE) {
            perror("round trip");
            return 1;
        }
        lat[i] = now_us() - t;
    }
    qsort(lat, ROUNDS, sizeof lat[0], cmp);
    printf("server core %s, client core %s: p50 %.1f us, p99 %.1f us\n", argv[1], argv[2],
           lat[ROUNDS / 2], lat[ROUNDS * 99 / 100]);
    close(c);
    waitpid(child, 0, 0);
    return 0;
}
