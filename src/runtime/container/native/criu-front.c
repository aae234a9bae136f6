/*
 * criu-front: what runc starts as its CRIU (`runc --criu`, or `criu` in PATH for runc >= 1.2).
 *
 * Before every checkpoint and restore, runc starts CRIU once just to ask its version over
 * CRIU's RPC socket (`criu swrk FD`, request type VERSION), then starts it again for the real
 * work. A CRIU start costs ~4.5 ms here (23 shared libraries), and the answer only changes
 * with the binary. So this front peeks at the first request without taking it off the socket:
 *
 *  - a bare VERSION request is answered from a cache file holding the real CRIU's own reply,
 *    stamped with that binary's identity (device, inode, size, mtime); when the cache is
 *    missing or stale, the request goes to the real CRIU once and its reply is stored;
 *  - anything else (and every other way of calling CRIU) execs the real CRIU in place, with
 *    the request still unread on the socket, so CRIU sees exactly what runc sent.
 *
 * Environment: CUBICLE_CRIU_REAL (the real binary, required) and CUBICLE_CRIU_VERSION_CACHE
 * (the cache file; without it every request goes to the real CRIU). See CRIU_FRONT_NOTE in
 * src/runtime/container/criu.ts.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_MESSAGE 65536

/* criu_req { type = VERSION (10) }: field 1, varint. */
static const unsigned char VERSION_REQUEST[] = {0x08, 0x0a};

static void exec_real(const char *real, char **argv) {
  argv[0] = (char *)real;
  execv(real, argv);
  fprintf(stderr, "criu-front: cannot execute %s: %s\n", real, strerror(errno));
  exit(127);
}

static int write_all(int fd, const void *data, size_t length) {
  const char *at = data;
  while (length > 0) {
    ssize_t written = write(fd, at, length);
    if (written < 0 && errno == EINTR) continue;
    if (written <= 0) return -1;
    at += written;
    length -= (size_t)written;
  }
  return 0;
}

static void stamp_of(const struct stat *st, char *out, size_t size) {
  snprintf(out, size, "cubicle-criu-version 1 %llu %llu %lld %lld.%09ld\n", (unsigned long long)st->st_dev, (unsigned long long)st->st_ino,
           (long long)st->st_size, (long long)st->st_mtim.tv_sec, st->st_mtim.tv_nsec);
}

/* The cached reply for this stamp, or -1. */
static ssize_t read_cache(const char *cache, const char *stamp, unsigned char *reply, size_t size) {
  char buffer[MAX_MESSAGE + 256];
  int fd = open(cache, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t total = 0, got;
  while ((got = read(fd, buffer + total, sizeof buffer - (size_t)total)) > 0) total += got;
  close(fd);
  size_t stamp_length = strlen(stamp);
  if (got < 0 || (size_t)total <= stamp_length || memcmp(buffer, stamp, stamp_length) != 0) return -1;
  size_t length = (size_t)total - stamp_length;
  if (length > size) return -1;
  memcpy(reply, buffer + stamp_length, length);
  return (ssize_t)length;
}

static void write_cache(const char *cache, const char *stamp, const unsigned char *reply, size_t length) {
  char temporary[4096];
  if (snprintf(temporary, sizeof temporary, "%s.tmp-%d", cache, (int)getpid()) >= (int)sizeof temporary) return;
  int fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return;
  int failed = write_all(fd, stamp, strlen(stamp)) || write_all(fd, reply, length);
  failed |= close(fd);
  if (failed || rename(temporary, cache) != 0) unlink(temporary);
}

/* Asks the real CRIU: relays runc's request on a socket of our own and returns the reply. */
static ssize_t ask_real(const char *real, int client, unsigned char *reply, size_t size) {
  unsigned char request[MAX_MESSAGE];
  ssize_t request_length = recv(client, request, sizeof request, 0);
  if (request_length <= 0) return -1;
  int pair[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) return -1;
  pid_t child = fork();
  if (child < 0) return -1;
  if (child == 0) {
    char fd_text[16];
    int server = dup(pair[1]); /* without CLOEXEC */
    snprintf(fd_text, sizeof fd_text, "%d", server);
    execl(real, real, "swrk", fd_text, (char *)NULL);
    _exit(127);
  }
  close(pair[1]);
  ssize_t length = -1;
  if (send(pair[0], request, (size_t)request_length, 0) == request_length) length = recv(pair[0], reply, size, 0);
  close(pair[0]);
  int status;
  while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  return length;
}

int main(int argc, char **argv) {
  const char *real = getenv("CUBICLE_CRIU_REAL");
  const char *cache = getenv("CUBICLE_CRIU_VERSION_CACHE");
  if (!real || !*real) {
    fprintf(stderr, "criu-front: CUBICLE_CRIU_REAL is not set\n");
    return 127;
  }
  if (!cache || !*cache || argc != 3 || strcmp(argv[1], "swrk") != 0) exec_real(real, argv);
  char *end;
  long client = strtol(argv[2], &end, 10);
  if (*end || client < 0 || client > 1 << 20) exec_real(real, argv);

  unsigned char peeked[sizeof VERSION_REQUEST + 1];
  ssize_t peeked_length;
  do peeked_length = recv((int)client, peeked, sizeof peeked, MSG_PEEK | MSG_TRUNC);
  while (peeked_length < 0 && errno == EINTR);
  if (peeked_length != (ssize_t)sizeof VERSION_REQUEST || memcmp(peeked, VERSION_REQUEST, sizeof VERSION_REQUEST) != 0) exec_real(real, argv);

  struct stat st;
  if (stat(real, &st) != 0) exec_real(real, argv);
  char stamp[256];
  stamp_of(&st, stamp, sizeof stamp);
  unsigned char reply[MAX_MESSAGE];
  ssize_t reply_length = read_cache(cache, stamp, reply, sizeof reply);
  if (reply_length > 0) {
    unsigned char request[sizeof VERSION_REQUEST];
    if (recv((int)client, request, sizeof request, 0) != (ssize_t)sizeof request) return 1;
  } else {
    reply_length = ask_real(real, (int)client, reply, sizeof reply);
    if (reply_length <= 0) {
      fprintf(stderr, "criu-front: %s did not answer the version request\n", real);
      return 1;
    }
    write_cache(cache, stamp, reply, (size_t)reply_length);
  }
  return send((int)client, reply, (size_t)reply_length, 0) == reply_length ? 0 : 1;
}
