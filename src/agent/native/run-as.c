/*
 * run-as UID GID GROUPS COMMAND [ARG...]
 *
 * The agent's way to start a command as another user: sets the supplementary groups (GROUPS,
 * comma-separated ids, or "-" for none), then the gid and uid, then execs COMMAND (searched in
 * PATH like execvp). It does what `setpriv --reuid --regid --groups --` does, but statically
 * linked: no dynamic loader, no shared libraries, nothing read from the environment (the
 * command's environment, LD_PRELOAD included, reaches only the command). See RUN_AS_NOTE in
 * src/agent/process/managed-process.ts for why it exists.
 *
 * Exit status when it cannot run the command, as setpriv: 127 when COMMAND is not found, 126
 * for any other exec failure, 125 for bad arguments or a refused credential change.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_GROUPS 256

static int parse_id(const char *text, unsigned long *out) {
  char *end;
  if (*text < '0' || *text > '9') return -1;
  errno = 0;
  *out = strtoul(text, &end, 10);
  return (errno || *end || *out > 0xfffffffeUL) ? -1 : 0;
}

static int parse_groups(char *text, gid_t *groups, size_t *count) {
  *count = 0;
  if (strcmp(text, "-") == 0) return 0;
  for (char *item = strtok(text, ","); item; item = strtok(NULL, ",")) {
    unsigned long id;
    if (*count == MAX_GROUPS || parse_id(item, &id)) return -1;
    groups[(*count)++] = (gid_t)id;
  }
  return 0;
}

int main(int argc, char **argv) {
  unsigned long uid, gid;
  gid_t groups[MAX_GROUPS];
  size_t count;
  if (argc < 5 || parse_id(argv[1], &uid) || parse_id(argv[2], &gid) || parse_groups(argv[3], groups, &count)) {
    fprintf(stderr, "run-as: usage: run-as UID GID GROUPS|- COMMAND [ARG...]\n");
    return 125;
  }
  if (setgroups(count, groups) != 0 || setgid((gid_t)gid) != 0 || setuid((uid_t)uid) != 0) {
    fprintf(stderr, "run-as: cannot become %lu:%lu: %s\n", uid, gid, strerror(errno));
    return 125;
  }
  execvp(argv[4], argv + 4);
  int failure = errno;
  fprintf(stderr, "run-as: failed to execute %s: %s\n", argv[4], strerror(failure));
  return failure == ENOENT ? 127 : 126;
}
