/*
 * LD_PRELOAD shim for the power-loss test (cli/tests/powerloss.rs).
 *
 * Records, in order, into the file named by POWERLOSS_LOG:
 *   - every write to a file whose path starts with POWERLOSS_DIR ('W': file, offset, bytes),
 *     logged after the write returned;
 *   - every successful fsync/fdatasync of such a file ('F': file, the name of the thread that
 *     synced it), logged after it returned;
 *   - every ftruncate of such a file ('T': file, length), logged after it returned;
 *   - every write/send to a socket ('S': bytes), logged BEFORE the bytes are handed to the
 *     kernel, so a reply counts as sent from the moment it might have left (including a
 *     writev(2) made with syscall(2), as the server makes its socket writes on Linux:
 *     src/transport/sys.rs);
 *   - each tracked file's path, once, when first opened ('N': file, path).
 * Records are appended with one write(2) each on an O_APPEND descriptor, so records of
 * concurrent threads never interleave. The test then rebuilds each file as of its last
 * sync before a cut point and checks that every AA sent before the cut names a stored message.
 *
 * Record layout (little endian): u8 kind, u32 file, u64 offset_or_length, u32 len, bytes.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FD 65536
#define MAX_FILES 64

static int log_fd = -1;
static const char *dir;
static size_t dir_len;
/* fd -> file number + 1 (0: not tracked). */
static uint8_t tracked[MAX_FD];
static char *names[MAX_FILES];
static int n_names;
static pthread_mutex_t names_lock = PTHREAD_MUTEX_INITIALIZER;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_send)(int, const void *, size_t, int);
static ssize_t (*real_sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
static ssize_t (*real_sendmsg)(int, const struct msghdr *, int);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_close)(int);
static long (*real_syscall)(long, ...);

#define RESOLVE(name) real_##name = dlsym(RTLD_NEXT, #name)

__attribute__((constructor)) static void init(void) {
    RESOLVE(syscall);
    RESOLVE(write); RESOLVE(pwrite); RESOLVE(pwrite64); RESOLVE(writev); RESOLVE(send);
    RESOLVE(sendto); RESOLVE(sendmsg); RESOLVE(fsync); RESOLVE(fdatasync); RESOLVE(ftruncate);
    RESOLVE(ftruncate64); RESOLVE(open); RESOLVE(open64); RESOLVE(openat); RESOLVE(openat64);
    RESOLVE(close);
    dir = getenv("POWERLOSS_DIR");
    dir_len = dir ? strlen(dir) : 0;
    const char *log = getenv("POWERLOSS_LOG");
    if (log && dir_len > 0) {
        log_fd = real_open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    }
}

static void put_record(uint8_t kind, uint32_t file, uint64_t off, const struct iovec *iov,
                       int iovcnt, size_t total) {
    if (log_fd < 0) return;
    size_t size = 17 + total;
    char stack[8192];
    char *buf = size <= sizeof stack ? stack : malloc(size);
    if (!buf) abort();
    uint32_t len = (uint32_t)total;
    buf[0] = (char)kind;
    memcpy(buf + 1, &file, 4);
    memcpy(buf + 5, &off, 8);
    memcpy(buf + 13, &len, 4);
    size_t at = 17;
    for (int i = 0; i < iovcnt && at < size; i++) {
        size_t n = iov[i].iov_len;
        if (n > size - at) n = size - at;
        memcpy(buf + at, iov[i].iov_base, n);
        at += n;
    }
    /* One append per record: a short write here would corrupt the log, so stop the process. */
    if (real_write(log_fd, buf, size) != (ssize_t)size) abort();
    if (buf != stack) free(buf);
}

static void put_bytes(uint8_t kind, uint32_t file, uint64_t off, const void *data, size_t n) {
    struct iovec iov = {(void *)data, n};
    put_record(kind, file, off, &iov, 1, n);
}

static int file_of(int fd) {
    return fd >= 0 && fd < MAX_FD ? tracked[fd] : 0;
}

static void track(int fd, const char *path) {
    if (fd < 0 || fd >= MAX_FD || dir_len == 0 || log_fd < 0) return;
    if (strncmp(path, dir, dir_len) != 0) {
        tracked[fd] = 0;
        return;
    }
    pthread_mutex_lock(&names_lock);
    int found = -1;
    for (int i = 0; i < n_names; i++) {
        if (strcmp(names[i], path) == 0) found = i;
    }
    if (found < 0 && n_names < MAX_FILES) {
        found = n_names++;
        names[found] = strdup(path);
        put_bytes('N', (uint32_t)found + 1, 0, path, strlen(path));
    }
    pthread_mutex_unlock(&names_lock);
    tracked[fd] = found < 0 ? 0 : (uint8_t)(found + 1);
}

static int is_socket(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

static mode_t mode_arg(int flags, va_list ap) {
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

int open(const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t mode = mode_arg(flags, ap); va_end(ap);
    int fd = real_open(path, flags, mode);
    track(fd, path);
    return fd;
}

int open64(const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t mode = mode_arg(flags, ap); va_end(ap);
    int fd = real_open64(path, flags, mode);
    track(fd, path);
    return fd;
}

int openat(int dirfd, const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t mode = mode_arg(flags, ap); va_end(ap);
    int fd = real_openat(dirfd, path, flags, mode);
    track(fd, path);
    return fd;
}

int openat64(int dirfd, const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t mode = mode_arg(flags, ap); va_end(ap);
    int fd = real_openat64(dirfd, path, flags, mode);
    track(fd, path);
    return fd;
}

int close(int fd) {
    if (fd >= 0 && fd < MAX_FD) tracked[fd] = 0;
    return real_close(fd);
}

ssize_t write(int fd, const void *data, size_t n) {
    int file = file_of(fd);
    if (file) {
        off_t off = lseek(fd, 0, SEEK_CUR);
        ssize_t r = real_write(fd, data, n);
        if (r > 0) put_bytes('W', file, (uint64_t)off, data, (size_t)r);
        return r;
    }
    if (fd != log_fd && is_socket(fd)) put_bytes('S', 0, 0, data, n);
    return real_write(fd, data, n);
}

static ssize_t positioned(ssize_t (*real)(int, const void *, size_t, off_t), int fd,
                          const void *data, size_t n, off_t off) {
    ssize_t r = real(fd, data, n, off);
    int file = file_of(fd);
    if (file && r > 0) put_bytes('W', file, (uint64_t)off, data, (size_t)r);
    return r;
}

ssize_t pwrite(int fd, const void *data, size_t n, off_t off) {
    return positioned(real_pwrite, fd, data, n, off);
}

ssize_t pwrite64(int fd, const void *data, size_t n, off_t off) {
    return positioned(real_pwrite64, fd, data, n, off);
}

static size_t iov_total(const struct iovec *iov, int n) {
    size_t total = 0;
    for (int i = 0; i < n; i++) total += iov[i].iov_len;
    return total;
}

ssize_t writev(int fd, const struct iovec *iov, int n) {
    int file = file_of(fd);
    if (file) {
        off_t off = lseek(fd, 0, SEEK_CUR);
        ssize_t r = real_writev(fd, iov, n);
        if (r > 0) put_record('W', file, (uint64_t)off, iov, n, (size_t)r);
        return r;
    }
    if (is_socket(fd)) put_record('S', 0, 0, iov, n, iov_total(iov, n));
    return real_writev(fd, iov, n);
}

/* syscall(2) takes up to six arguments in registers; it reads all six whatever the caller
 * passed (as glibc's own does), and so does this. */
long syscall(long number, ...) {
    va_list ap;
    va_start(ap, number);
    long a[6];
    for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    /* Rust's std makes its futex calls with syscall(2), possibly before `init` ran. */
    if (!real_syscall) RESOLVE(syscall);
    if (number == SYS_writev && is_socket((int)a[0])) {
        const struct iovec *iov = (const struct iovec *)a[1];
        put_record('S', 0, 0, iov, (int)a[2], iov_total(iov, (int)a[2]));
    }
    return real_syscall(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}

ssize_t send(int fd, const void *data, size_t n, int flags) {
    put_bytes('S', 0, 0, data, n);
    return real_send(fd, data, n, flags);
}

ssize_t sendto(int fd, const void *data, size_t n, int flags, const struct sockaddr *to,
               socklen_t to_len) {
    put_bytes('S', 0, 0, data, n);
    return real_sendto(fd, data, n, flags, to, to_len);
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
    put_record('S', 0, 0, msg->msg_iov, (int)msg->msg_iovlen,
               iov_total(msg->msg_iov, (int)msg->msg_iovlen));
    return real_sendmsg(fd, msg, flags);
}

static int synced(int (*real)(int), int fd) {
    int r = real(fd);
    int file = file_of(fd);
    if (file && r == 0) {
        char name[17] = {0};
        prctl(PR_GET_NAME, name, 0, 0, 0);
        put_bytes('F', file, 0, name, strlen(name));
    }
    return r;
}

int fsync(int fd) { return synced(real_fsync, fd); }
int fdatasync(int fd) { return synced(real_fdatasync, fd); }

static int truncated(int (*real)(int, off_t), int fd, off_t len) {
    int r = real(fd, len);
    int file = file_of(fd);
    if (file && r == 0) put_bytes('T', file, (uint64_t)len, NULL, 0);
    return r;
}

int ftruncate(int fd, off_t len) { return truncated(real_ftruncate, fd, len); }
int ftruncate64(int fd, off_t len) { return truncated(real_ftruncate64, fd, len); }
