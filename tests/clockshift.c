/* LD_PRELOAD shim for tests: shifts CLOCK_REALTIME by the seconds written in the
 * file named by $CLOCKSHIFT_FILE, read again on every call, so that a test can
 * step the wall clock of a running process. CLOCK_MONOTONIC is left alone. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long shift(void)
{
    const char *path = getenv("CLOCKSHIFT_FILE");
    char text[32] = {0};
    int fd;

    if (!path || (fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
        return 0;
    if (read(fd, text, sizeof text - 1) < 0)
        text[0] = 0;
    close(fd);
    return strtol(text, NULL, 10);
}

int clock_gettime(clockid_t clock, struct timespec *ts)
{
    static int (*real)(clockid_t, struct timespec *);
    int rc;

    if (!real)
        real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    rc = real(clock, ts);
    if (rc == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE))
        ts->tv_sec += shift();
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz)
{
    struct timespec ts;

    if (clock_gettime(CLOCK_REALTIME, &ts))
        return -1;
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
    (void)tz;
    return 0;
}

time_t time(time_t *out)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    if (out)
        *out = ts.tv_sec;
    return ts.tv_sec;
}
