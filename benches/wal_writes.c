/* What SQLite's WAL writes cost in system calls (issue #21; store/src/wal_batch.rs).
 *
 * Writes 4 000 WAL frames (a 24-byte header + a 4 096-byte page each: 16.5 MB) to FILE, 20
 * times over the same range (as a reused WAL is), three ways, and prints CPU µs per frame:
 *   mode 0: two pwrite calls per frame, as SQLite's WAL does (header, then page);
 *   mode 1: one pwrite per frame;
 *   mode 2: 160 frames per pwrite (~640 KiB: what store/src/wal_batch.rs makes of a commit,
 *           there in 124 KiB pieces).
 *
 * Usage: cc -O2 benches/wal_writes.c -o /tmp/wal_writes && /tmp/wal_writes /tmp/wal_writes.f
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define FRAME 4120
#define FRAMES 4000
#define REPS 20
#define GROUP 160

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s FILE\n", argv[0]);
    return 2;
  }
  int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) {
    perror("open");
    return 1;
  }
  static char buf[FRAME * GROUP];
  memset(buf, 1, sizeof buf);
  for (int mode = 0; mode < 3; mode++) {
    clock_t c0 = clock();
    for (int rep = 0; rep < REPS; rep++) {
      long off = 32;
      for (int i = 0; i < FRAMES;) {
        ssize_t n;
        if (mode == 0) {
          n = pwrite(fd, buf, 24, off) + pwrite(fd, buf, FRAME - 24, off + 24);
          i += 1;
        } else if (mode == 1) {
          n = pwrite(fd, buf, FRAME, off);
          i += 1;
        } else {
          n = pwrite(fd, buf, FRAME * GROUP, off);
          i += GROUP;
        }
        if (n <= 0) {
          perror("pwrite");
          return 1;
        }
        off += n;
      }
    }
    double us = (double)(clock() - c0) / CLOCKS_PER_SEC * 1e6 / (REPS * FRAMES);
    printf("mode %d (%s): %.2f µs of CPU per frame\n", mode,
           mode == 0 ? "two writes per frame" : mode == 1 ? "one write per frame" : "160 frames per write", us);
  }
  unlink(argv[1]);
  return 0;
}
