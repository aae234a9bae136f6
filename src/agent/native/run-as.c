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
 * Before anything else it sets its own oom_score_adj to 1000 (OOM_NOTE), which COMMAND and
 * everything it starts inherit: when the sandbox runs out of memory, the kernel's OOM killer
 * takes a user process, never the agent (which stays at its own, lower score) or tini. Raising
 * the score needs no privilege; lowering it below the inherited minimum would need
 * CAP_SYS_RESOURCE in the initial user namespace, which neither the sandbox nor, on this
 * project's hosts, the host's root has: so the agent cannot be protected by lowering its own.
 * A missing /proc is not an error (the command runs unmarked).
 *
 * Exit status when it cannot run the command, as setpriv: 127 when COMMAND is not found, 126
 * for any other exec failure, 125 for bad arguments or a refused credential change.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <unistd.h>

#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#endif

#define MAX_GROUPS 256
#define OOM_SCORE_ADJ "1000"

static void mark_for_oom_killer(void) {
  int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return;
  if (write(fd, OOM_SCORE_ADJ, sizeof OOM_SCORE_ADJ - 1) < 0) {
    /* best effort: the command still runs */
  }
  close(fd);
}

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

/*
 * The agent may run with merging on and randomisation off (sandbox-boot --merge-memory), which
 * exec would hand down: the sandbox's own processes get neither. This process's memory is its
 * own since its exec, so switching merging off here does not touch the agent's.
 */
static void undo_agent_memory_settings(void) {
  int current = personality(0xffffffff);
  if (current != -1 && (current & ADDR_NO_RANDOMIZE)) personality((unsigned long)current & ~ADDR_NO_RANDOMIZE);
  prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0);
}

int main(int argc, char **argv) {
  unsigned long uid, gid;
  gid_t groups[MAX_GROUPS];
  size_t count;
  if (argc < 5 || parse_id(argv[1], &uid) || parse_id(argv[2], &gid) || parse_groups(argv[3], groups, &count)) {
    fprintf(stderr, "run-as: usage: run-as UID GID GROUPS|- COMMAND [ARG...]\n");
    return 125;
  }
  mark_for_oom_killer();
  undo_agent_memory_settings();
  if (setgroups(count, groups) != 0 || setgid((gid_t)gid) != 0 || setuid((uid_t)uid) != 0) {
    fprintf(stderr, "run-as: cannot become %lu:%lu: %s\n", uid, gid, strerror(errno));
    return 125;
  }
  execvp(argv[4], argv + 4);
  int failure = errno;
  fprintf(stderr, "run-as: failed to execute %s: %s\n", argv[4], strerror(failure));
  return failure == ENOENT ? 127 : 126;
}
