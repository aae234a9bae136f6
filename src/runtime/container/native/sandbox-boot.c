/*
 * sandbox-boot: the first program of every container sandbox that boots (runc runs it from the
 * kit as the container's process, PID 1, before the init); it makes the sandbox boot as a
 * machine of its own (BOOT_IDENTITY_NOTE in src/runtime/container/boot-identity.ts):
 *
 *   1. a time namespace of its own whose monotonic and boot-time clocks start at zero, so that
 *      /proc/uptime and every monotonic clock count from this boot (runc 1.1 has no time
 *      namespaces);
 *   2. the sandbox's boot id, which runc bound read-only at /.cubicle/boot-id from a file of
 *      the bundle, bound again over /proc/sys/kernel/random/boot_id (runc 1.1 refuses
 *      config.json mounts under /proc);
 *   3. CAP_SYS_ADMIN and CAP_SYS_TIME, which runc gave it for the two steps above and the
 *      sandbox must not keep, dropped from every set (bounding included) and checked gone;
 *
 * and then it execs PROGRAM (the init), which stays PID 1. Any failure ends it with exit 1 and
 * a message on stderr: it never execs PROGRAM half done, and never with those capabilities.
 *
 * With --merge-memory (AGENT_MEMORY_MERGE_NOTE in src/runtime/container/agent-kit.ts) it also
 * switches on kernel samepage merging for itself and everything it execs (PR_SET_MEMORY_MERGE,
 * Linux 6.4; kept across exec since 6.7) and turns address-space randomisation off
 * (ADDR_NO_RANDOMIZE), so that every sandbox's idle agent lays its heap out at the same
 * addresses and most of its pages are identical to the other agents'. Both are best effort: a
 * kernel without them boots the sandbox as before. The agent's process starts (spawn.c, run-as.c)
 * turn randomisation back on for the commands of the sandbox.
 *
 *   sandbox-boot [--merge-memory] -- PROGRAM [ARG]...
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/magic.h>
#include <linux/mount.h>
#include <linux/openat2.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Where runc binds the bundle's boot id file (oci-spec.ts, BOOT_ID_SOURCE). */
#define BOOT_ID_SOURCE "/.cubicle/boot-id"
#define BOOT_ID_PATH "proc/sys/kernel/random/boot_id"
/* "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx\n" */
#define BOOT_ID_SIZE 37

#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#endif

static void fail(const char *what) {
  fprintf(stderr, "sandbox-boot: %s: %s\n", what, strerror(errno));
  exit(1);
}

static long long nanoseconds_of(clockid_t clock) {
  struct timespec now;
  if (clock_gettime(clock, &now) != 0) fail("reading the clocks");
  return (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
}

/* When this process started, in ns of the boot-time clock (/proc/self/stat field 22, in ticks). */
static long long own_start_nanoseconds(void) {
  char text[1024];
  int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
  ssize_t length = fd < 0 ? -1 : read(fd, text, sizeof text - 1);
  if (length <= 0) fail("/proc/self/stat");
  close(fd);
  text[length] = 0;
  /* The command may hold spaces and parentheses: fields are counted from the last ')'. */
  char *field = strrchr(text, ')');
  for (int i = 0; field && i < 20; i++) field = strchr(field + 1, ' ');
  long ticks_per_second = sysconf(_SC_CLK_TCK);
  if (!field || ticks_per_second <= 0) {
    errno = EINVAL;
    fail("/proc/self/stat");
  }
  return strtoll(field + 1, NULL, 10) * (1000000000LL / ticks_per_second);
}

/* "<clock> <seconds> <nanoseconds>\n" for an offset in ns (the nanoseconds are never negative). */
static int offset_line(char *out, size_t size, clockid_t clock, long long offset) {
  long long seconds = offset / 1000000000LL, nanoseconds = offset % 1000000000LL;
  if (nanoseconds < 0) {
    seconds -= 1;
    nanoseconds += 1000000000LL;
  }
  return snprintf(out, size, "%d %lld %lld\n", (int)clock, seconds, nanoseconds);
}

/*
 * The sandbox's clocks count from the start of this process, its PID 1: a clock that started
 * later would give PID 1 a start time before zero (ps shows it as a huge age).
 */
static void new_clocks(void) {
  long long started = own_start_nanoseconds();
  long long boottime = nanoseconds_of(CLOCK_BOOTTIME), monotonic = nanoseconds_of(CLOCK_MONOTONIC);
  long long uptime = boottime > started ? boottime - started : 0;
  if (unshare(CLONE_NEWTIME) != 0) fail("making a time namespace");
  /* Offsets can be set only while no process is in the namespace: before the setns below. */
  char offsets[128];
  int length = offset_line(offsets, sizeof offsets, CLOCK_MONOTONIC, uptime - monotonic);
  length += offset_line(offsets + length, sizeof offsets - (size_t)length, CLOCK_BOOTTIME, uptime - boottime);
  int fd = open("/proc/self/timens_offsets", O_WRONLY | O_CLOEXEC);
  if (fd < 0 || write(fd, offsets, (size_t)length) != length) fail("setting the time namespace's clocks");
  close(fd);
  /* Entered now (a single-threaded process may), not only at the exec, whatever the kernel. */
  int ns = open("/proc/self/ns/time_for_children", O_RDONLY | O_CLOEXEC);
  if (ns < 0 || setns(ns, CLONE_NEWTIME) != 0) fail("entering the time namespace");
  close(ns);
}

static void bind_boot_id(void) {
  int source = open(BOOT_ID_SOURCE, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (source < 0) fail(BOOT_ID_SOURCE);
  struct stat info;
  if (fstat(source, &info) != 0) fail(BOOT_ID_SOURCE);
  /* The kit's own file is an empty mount point: runc must have bound the sandbox's over it. */
  if (!S_ISREG(info.st_mode) || info.st_size != BOOT_ID_SIZE) {
    errno = EINVAL;
    fail(BOOT_ID_SOURCE " holds no boot id");
  }
  /* Looked up without following symlinks: the root is the sandbox's own tree. */
  int root = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (root < 0) fail("/");
  struct open_how how = {.flags = O_PATH | O_CLOEXEC, .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS};
  int target = (int)syscall(SYS_openat2, root, BOOT_ID_PATH, &how, sizeof how);
  if (target < 0) fail("/" BOOT_ID_PATH);
  struct statfs fs;
  if (fstatfs(target, &fs) != 0) fail("/" BOOT_ID_PATH);
  if (fs.f_type != PROC_SUPER_MAGIC) {
    errno = EINVAL;
    fail("/" BOOT_ID_PATH " is not on procfs");
  }
  int tree = (int)syscall(SYS_open_tree, source, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH);
  if (tree < 0) fail("cloning " BOOT_ID_SOURCE);
  struct mount_attr attr = {0};
  attr.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
  if (syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH, &attr, sizeof attr) != 0) fail("making the boot id mount read-only");
  if (syscall(SYS_move_mount, tree, "", target, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) != 0) fail("mounting the boot id");
  close(tree);
  close(target);
  close(root);
  close(source);
}

static int has(const struct __user_cap_data_struct data[2], int field, int cap) {
  const __u32 *word = field == 0 ? &data[cap / 32].effective : field == 1 ? &data[cap / 32].permitted : &data[cap / 32].inheritable;
  return (*word >> (cap % 32)) & 1;
}

static void drop_boot_capabilities(void) {
  static const int dropped[] = {CAP_SYS_ADMIN, CAP_SYS_TIME};
  for (size_t i = 0; i < sizeof dropped / sizeof dropped[0]; i++)
    if (prctl(PR_CAPBSET_DROP, dropped[i], 0, 0, 0) != 0) fail("dropping a capability from the bounding set");
  if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) fail("clearing the ambient capabilities");
  struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[2];
  if (syscall(SYS_capget, &header, data) != 0) fail("capget");
  for (size_t i = 0; i < sizeof dropped / sizeof dropped[0]; i++) {
    __u32 mask = ~(1u << (dropped[i] % 32));
    data[dropped[i] / 32].effective &= mask;
    data[dropped[i] / 32].permitted &= mask;
    data[dropped[i] / 32].inheritable &= mask;
  }
  if (syscall(SYS_capset, &header, data) != 0) fail("capset");
  if (syscall(SYS_capget, &header, data) != 0) fail("capget");
  for (size_t i = 0; i < sizeof dropped / sizeof dropped[0]; i++) {
    if (has(data, 0, dropped[i]) || has(data, 1, dropped[i]) || has(data, 2, dropped[i]) || prctl(PR_CAPBSET_READ, dropped[i], 0, 0, 0) != 0) {
      errno = EPERM;
      fail("a boot capability is still held");
    }
  }
}

/* Best effort (see the head comment): a message, and the sandbox boots without. */
static void merge_memory(void) {
  int current = personality(0xffffffff);
  if (current == -1 || personality((unsigned long)current | ADDR_NO_RANDOMIZE) == -1)
    fprintf(stderr, "sandbox-boot: cannot turn address randomisation off: %s\n", strerror(errno));
  if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0) fprintf(stderr, "sandbox-boot: cannot turn memory merging on: %s\n", strerror(errno));
}

int main(int argc, char **argv) {
  int first = 1, merge = 0;
  if (argc > 1 && strcmp(argv[1], "--merge-memory") == 0) merge = 1, first = 2;
  if (argc < first + 2 || strcmp(argv[first], "--") != 0) {
    fprintf(stderr, "sandbox-boot: usage: sandbox-boot [--merge-memory] -- PROGRAM [ARG]...\n");
    return 2;
  }
  new_clocks();
  bind_boot_id();
  drop_boot_capabilities();
  if (merge) merge_memory();
  execv(argv[first + 1], argv + first + 1);
  fail(argv[first + 1]);
  return 1;
}
