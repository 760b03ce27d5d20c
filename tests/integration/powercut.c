/* LD_PRELOAD for redis-server: a SIGKILL then loses what a power cut would lose.
 *
 * A process killed by SIGKILL loses nothing it has write(2)n: the kernel's page cache still reaches the
 * disk. A power cut (a kernel panic, a VM killed) loses everything not yet fsync'd. This library keeps
 * the bytes written to Redis's incremental AOF files (`*.incr.aof`) in the process's own memory until
 * fsync/fdatasync (or close) hands them to the kernel, so SIGKILL drops exactly the unsynced tail.
 * tests/integration/test_durability.py compiles it (cc -shared -fPIC) when a C compiler is there.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_FD 4096

static char *held[MAX_FD];
static size_t held_len[MAX_FD], held_cap[MAX_FD];
static char tracked[MAX_FD];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void *next(const char *name) { return dlsym(RTLD_NEXT, name); }

static void track(int fd, const char *path) {
    if (fd < 0 || fd >= MAX_FD) return;
    pthread_mutex_lock(&lock);
    tracked[fd] = path != NULL && strstr(path, ".incr.aof") != NULL;
    held_len[fd] = 0;
    pthread_mutex_unlock(&lock);
}

/* Hands the held bytes to the kernel; called with the lock held. */
static int release(int fd) {
    static ssize_t (*real_write)(int, const void *, size_t);
    if (!real_write) real_write = next("write");
    size_t done = 0;
    while (done < held_len[fd]) {
        ssize_t n = real_write(fd, held[fd] + done, held_len[fd] - done);
        if (n < 0) return -1;
        done += (size_t)n;
    }
    held_len[fd] = 0;
    return 0;
}

static int opened(const char *name, int dirfd, const char *path, int flags, mode_t mode) {
    int fd;
    if (dirfd == -1) {
        int (*real)(const char *, int, ...) = next(name);
        fd = real(path, flags, mode);
    } else {
        int (*real)(int, const char *, int, ...) = next(name);
        fd = real(dirfd, path, flags, mode);
    }
    track(fd, path);
    return fd;
}

static mode_t mode_of(int flags, va_list ap) {
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

int open(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_of(flags, ap);
    va_end(ap);
    return opened("open", -1, path, flags, mode);
}

int open64(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_of(flags, ap);
    va_end(ap);
    return opened("open64", -1, path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_of(flags, ap);
    va_end(ap);
    return opened("openat", dirfd, path, flags, mode);
}

ssize_t write(int fd, const void *data, size_t n) {
    if (fd >= 0 && fd < MAX_FD && tracked[fd]) {
        pthread_mutex_lock(&lock);
        if (held_len[fd] + n > held_cap[fd]) {
            size_t cap = (held_len[fd] + n) * 2;
            char *grown = realloc(held[fd], cap);
            if (grown == NULL) {
                pthread_mutex_unlock(&lock);
                return -1;
            }
            held[fd] = grown;
            held_cap[fd] = cap;
        }
        memcpy(held[fd] + held_len[fd], data, n);
        held_len[fd] += n;
        pthread_mutex_unlock(&lock);
        return (ssize_t)n;
    }
    static ssize_t (*real)(int, const void *, size_t);
    if (!real) real = next("write");
    return real(fd, data, n);
}

static int synced(const char *name, int fd) {
    if (fd >= 0 && fd < MAX_FD && tracked[fd]) {
        pthread_mutex_lock(&lock);
        int rc = release(fd);
        pthread_mutex_unlock(&lock);
        if (rc < 0) return -1;
    }
    int (*real)(int) = next(name);
    return real(fd);
}

int fsync(int fd) { return synced("fsync", fd); }

int fdatasync(int fd) { return synced("fdatasync", fd); }

int close(int fd) {
    if (fd >= 0 && fd < MAX_FD && tracked[fd]) {
        pthread_mutex_lock(&lock);
        release(fd);
        tracked[fd] = 0;
        pthread_mutex_unlock(&lock);
    }
    static int (*real)(int);
    if (!real) real = next("close");
    return real(fd);
}
