/*
 * codebase-fs: serves a host directory (a "codebase") into a sandbox through FUSE, with
 * AgentFense-style per-path permission levels. It runs as host root, outside the sandbox, and the
 * mount has no `default_permissions`: the kernel asks the daemon about every access, so nobody in
 * the sandbox (root there included, who has no privileges on the host) gets around the rules.
 *
 *   codebase-fs --source DIR --mount MNT --rules FILE --uid U --gid G --owner-uid OU --owner-gid OG
 *
 * Every visible entry is presented as owned by U:G (the sandbox user's host ids); files and
 * directories created in DIR are chowned to OU:OG. "ready" goes to stdout once the mount is live;
 * the daemon exits 0 when MNT is unmounted, 1 when it cannot start, 2 on bad arguments or rules.
 *
 * Rules file (UTF-8, one rule a line, blank lines ignored, at most MAX_RULES rules):
 *   default<TAB>LEVEL          exactly once
 *   LEVEL<TAB>PATTERN          any number
 * LEVEL is none, view, read or write. PATTERN is matched against the path relative to DIR without
 * a leading slash ("src/main.c"; the root is ""): `*` is any run of characters but `/`, `?` one
 * character but `/`, a whole `**` segment zero or more segments (so a trailing `**` also matches
 * the directory it follows). The most specific matching rule wins: a pattern without wildcards
 * beats any with one, then more literal characters win, then the more restrictive level. No
 * match: the default. A path under a `none` directory is `none` too, and the root is always at
 * least `view`.
 *
 * Levels:
 *   none   invisible: ENOENT for everything on it; creating or renaming onto it: EACCES.
 *   view   listed and stat-able (mode without write bits, files also without read bits);
 *          directories can be listed and traversed; opening a file or reading a link: EACCES.
 *   read   read-only: open O_RDONLY, readlink; any modification: EACCES.
 *   write  everything. A change needs `write` on the path changed (for a create, the new path;
 *          for a rename, both). Renaming a directory is always EXDEV (so `mv` copies and deletes
 *          file by file through the checks; a moved directory would carry hidden files out from
 *          under the rule that hides them). link and chown are EPERM (chown to the presented
 *          owner is a no-op that succeeds), mknod of anything but a regular file is EPERM.
 *
 * Host safety: a sandbox with `write` somewhere can put a symlink in place of any directory at
 * any moment. Every access to DIR goes through root_fd, opened once: the parent of a target is
 * opened with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) and the last
 * component is acted on with *at calls that never follow it. Files are opened O_PATH first and
 * reopened through /proc/self/fd only when they are regular files, so a FIFO or a device node
 * in DIR is never opened by the daemon. Set-id bits are never set on what the sandbox creates or
 * chmods (the files belong to OU on the host).
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 31
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <getopt.h>
#include <limits.h>
#include <linux/openat2.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_RULES 1000
#define MAX_SEGMENTS (PATH_MAX / 2) /* "a/b/c...": at most one segment per two bytes */
#define MODE_MASK (S_IRWXU | S_IRWXG | S_IRWXO | S_ISVTX) /* no set-id bits from the sandbox */

enum level { LEVEL_NONE, LEVEL_VIEW, LEVEL_READ, LEVEL_WRITE }; /* ordered: more is more allowed */

static const char *const level_names[] = {"none", "view", "read", "write"};

struct segment {
  const char *text;
  size_t length;
};

struct rule {
  char *pattern;
  struct segment *segments;
  size_t segment_count;
  bool has_wildcard;
  size_t literal_count; /* UTF-8 characters other than `*` and `?` */
  enum level level;
};

static struct rule rules[MAX_RULES];
static size_t rule_count;
static enum level default_level;

static int root_fd = -1;          /* O_PATH fd of DIR, the only way into it */
static uid_t view_uid, owner_uid; /* presented owner; owner of what the daemon creates */
static gid_t view_gid, owner_gid;

/* What open/create/opendir leave in fi->fh. */
struct handle {
  int fd;
  DIR *dir;          /* directories only */
  char *rel;         /* directories only: the path, to judge the children readdir lists */
  enum level level;  /* the level at open time: ops with a NULL path (nullpath_ok) use it */
};

/* ---- Rules ---- */

static bool is_continuation(char c) { return ((unsigned char)c & 0xC0) == 0x80; }

/* One segment against a glob without `/`: `*` any run, `?` one UTF-8 character. */
static bool segment_matches(const char *p, size_t pn, const char *s, size_t sn) {
  size_t pi = 0, si = 0, star = SIZE_MAX, mark = 0;
  while (si < sn) {
    if (pi < pn && p[pi] == '?') {
      pi++;
      si++;
      while (si < sn && is_continuation(s[si])) si++;
    } else if (pi < pn && p[pi] == '*') {
      star = pi++;
      mark = si;
    } else if (pi < pn && p[pi] == s[si]) {
      pi++;
      si++;
    } else if (star != SIZE_MAX) {
      /* Let the last `*` take one more character (a whole UTF-8 one) and retry from there. */
      pi = star + 1;
      do mark++;
      while (mark < sn && is_continuation(s[mark]));
      si = mark;
    } else {
      return false;
    }
  }
  while (pi < pn && p[pi] == '*') pi++;
  return pi == pn;
}

/*
 * Walks the pattern segment by segment, keeping the set of path positions it can have reached so
 * far: (pattern segments x path segments) steps however many `**` there are, no backtracking.
 */
static bool pattern_matches(const struct rule *rule, const struct segment *path, size_t count) {
  static bool reach[MAX_SEGMENTS + 1], next[MAX_SEGMENTS + 1];
  memset(reach, 0, (count + 1) * sizeof *reach);
  reach[0] = true;
  for (size_t i = 0; i < rule->segment_count; i++) {
    const struct segment *seg = &rule->segments[i];
    bool any = false;
    if (seg->length == 2 && memcmp(seg->text, "**", 2) == 0) {
      bool seen = false; /* from the first reachable position on, every later one is reachable */
      for (size_t j = 0; j <= count; j++) {
        seen = seen || reach[j];
        next[j] = seen;
        any = any || seen;
      }
    } else {
      next[0] = false;
      for (size_t j = 0; j < count; j++) {
        next[j + 1] = reach[j] && segment_matches(seg->text, seg->length, path[j].text, path[j].length);
        any = any || next[j + 1];
      }
    }
    if (!any) return false;
    memcpy(reach, next, (count + 1) * sizeof *reach);
  }
  return reach[count];
}

/* Splits a relative path ("" is the root) into segments; false when it has too many. */
static bool split_segments(const char *rel, struct segment *out, size_t *count) {
  *count = 0;
  if (*rel == '\0') return true;
  const char *start = rel;
  for (const char *p = rel;; p++) {
    if (*p == '/' || *p == '\0') {
      if (*count == MAX_SEGMENTS) return false;
      out[(*count)++] = (struct segment){start, (size_t)(p - start)};
      if (*p == '\0') return true;
      start = p + 1;
    }
  }
}

/* The level the rules give one path, ignoring its ancestors. */
static enum level rule_level(const char *rel) {
  static struct segment path[MAX_SEGMENTS];
  size_t count;
  if (!split_segments(rel, path, &count)) return LEVEL_NONE;
  const struct rule *best = NULL;
  for (size_t i = 0; i < rule_count; i++) {
    const struct rule *rule = &rules[i];
    if (!pattern_matches(rule, path, count)) continue;
    if (best != NULL) {
      if (rule->has_wildcard != best->has_wildcard) {
        if (rule->has_wildcard) continue;
      } else if (rule->literal_count != best->literal_count) {
        if (rule->literal_count < best->literal_count) continue;
      } else if (rule->level >= best->level) {
        continue;
      }
    }
    best = rule;
  }
  return best ? best->level : default_level;
}

/*
 * The effective level: `none` when any ancestor is `none` (the kernel could not look the path up
 * anyway; this keeps the daemon's answer the same when asked directly), the root at least `view`.
 */
/*
 * HIDDEN_RMDIR_NOTE: an rmdir of a directory that looks empty but holds `none` entries would
 * fail ENOTEMPTY on the host, telling the sandbox that something it cannot see is there.
 * Instead the directory is hidden from this mount (a whiteout: the path and everything below it
 * are `none`) and the rmdir succeeds, as it would on an empty directory; the host keeps the
 * directory and its hidden entries. A mkdir of that path, where the rules allow it, brings the
 * directory back, empty to the sandbox as a new one would be. Whiteouts live as long as the
 * daemon (the sandbox's mount); at most WHITEOUTS_MAX (then ENOTEMPTY again). The daemon is
 * single-threaded, so the list needs no lock.
 */
#define WHITEOUTS_MAX 4096
static char *whiteouts[WHITEOUTS_MAX];
static size_t whiteout_count;

/* The whiteout at `rel` or at a directory above it, as an index; -1 when none. */
static long whiteout_of(const char *rel) {
  for (size_t i = 0; i < whiteout_count; i++) {
    size_t length = strlen(whiteouts[i]);
    if (strncmp(rel, whiteouts[i], length) == 0 && (rel[length] == '\0' || rel[length] == '/')) return (long)i;
  }
  return -1;
}

static void remove_whiteout(long index) {
  free(whiteouts[index]);
  whiteouts[index] = whiteouts[--whiteout_count];
}

/* The level the rules give `rel` (whiteouts aside). */
static enum level rules_level(const char *rel) {
  char prefix[PATH_MAX];
  size_t length = strlen(rel);
  if (length >= sizeof prefix) return LEVEL_NONE;
  for (size_t i = 0; i < length; i++) {
    if (rel[i] != '/') continue;
    memcpy(prefix, rel, i);
    prefix[i] = '\0';
    if (rule_level(prefix) == LEVEL_NONE) return LEVEL_NONE;
  }
  enum level level = rule_level(rel);
  if (length == 0 && level < LEVEL_VIEW) level = LEVEL_VIEW;
  return level;
}

/* The level of `rel` in this mount: the rules', and `none` below a whiteout (HIDDEN_RMDIR_NOTE). */
static enum level path_level(const char *rel) {
  if (whiteout_count && *rel && whiteout_of(rel) >= 0) return LEVEL_NONE;
  return rules_level(rel);
}

static bool parse_level(const char *text, enum level *level) {
  for (int i = LEVEL_NONE; i <= LEVEL_WRITE; i++)
    if (strcmp(text, level_names[i]) == 0) {
      *level = (enum level)i;
      return true;
    }
  return false;
}

/* A pattern is a relative path: no leading `/`, no empty, `.` or `..` segment. */
static const char *pattern_problem(const char *pattern) {
  if (*pattern == '\0') return "empty pattern";
  if (*pattern == '/') return "pattern must be relative (no leading '/')";
  const char *start = pattern;
  for (const char *p = pattern;; p++) {
    if (*p != '/' && *p != '\0') continue;
    size_t length = (size_t)(p - start);
    if (length == 0) return "pattern has an empty segment ('//' or a trailing '/')";
    if ((length == 1 && start[0] == '.') || (length == 2 && start[0] == '.' && start[1] == '.'))
      return "pattern has a '.' or '..' segment";
    if (*p == '\0') return NULL;
    start = p + 1;
  }
}

static void add_rule(char *pattern, enum level level) {
  struct rule *rule = &rules[rule_count++];
  rule->pattern = pattern;
  rule->level = level;
  for (const char *p = pattern; *p; p++) {
    if (*p == '*' || *p == '?') rule->has_wildcard = true;
    else if (!is_continuation(*p)) rule->literal_count++;
  }
  size_t count = 1;
  for (const char *p = pattern; *p; p++) count += *p == '/';
  rule->segments = calloc(count, sizeof *rule->segments);
  if (!rule->segments) {
    fprintf(stderr, "codebase-fs: out of memory\n");
    exit(1);
  }
  split_segments(pattern, rule->segments, &rule->segment_count);
}

static void rules_error(const char *file, unsigned long line, const char *problem) {
  fprintf(stderr, "codebase-fs: rules file %s, line %lu: %s\n", file, line, problem);
  exit(2);
}

/* Loads the rules file; any malformed line exits 2 with the line named. */
static void load_rules(const char *file) {
  FILE *in = fopen(file, "r");
  if (!in) {
    fprintf(stderr, "codebase-fs: cannot read rules file %s: %s\n", file, strerror(errno));
    exit(2);
  }
  bool have_default = false;
  char *line = NULL;
  size_t capacity = 0;
  ssize_t length;
  unsigned long number = 0;
  while ((length = getline(&line, &capacity, in)) >= 0) {
    number++;
    if (length > 0 && line[length - 1] == '\n') line[--length] = '\0';
    if (length > 0 && line[length - 1] == '\r') line[--length] = '\0';
    if (length == 0) continue;
    if (strlen(line) != (size_t)length) rules_error(file, number, "NUL byte in line");
    if (length >= PATH_MAX) rules_error(file, number, "line too long");
    char *tab = strchr(line, '\t');
    if (!tab) rules_error(file, number, "expected LEVEL<TAB>PATTERN or default<TAB>LEVEL");
    *tab = '\0';
    const char *first = line, *second = tab + 1;
    enum level level;
    if (strcmp(first, "default") == 0) {
      if (have_default) rules_error(file, number, "second default line");
      if (!parse_level(second, &level)) rules_error(file, number, "default level must be none, view, read or write");
      default_level = level;
      have_default = true;
      continue;
    }
    if (!parse_level(first, &level)) rules_error(file, number, "level must be none, view, read or write");
    const char *problem = pattern_problem(second);
    if (problem) rules_error(file, number, problem);
    if (rule_count == MAX_RULES) rules_error(file, number, "more than 1000 rules");
    char *pattern = strdup(second);
    if (!pattern) rules_error(file, number, "out of memory");
    add_rule(pattern, level);
  }
  if (ferror(in)) {
    fprintf(stderr, "codebase-fs: cannot read rules file %s: %s\n", file, strerror(errno));
    exit(2);
  }
  free(line);
  fclose(in);
  if (!have_default) {
    fprintf(stderr, "codebase-fs: rules file %s has no default<TAB>LEVEL line\n", file);
    exit(2);
  }
}

/* ---- Paths on the host ---- */

/*
 * Turns a FUSE path ("/a/b") into one relative to DIR ("a/b", "" for the root) and its level.
 * libfuse already normalises paths; an empty, `.` or `..` segment is refused all the same.
 */
static int resolve(const char *path, const char **rel, enum level *level) {
  if (path == NULL || path[0] != '/') return -EINVAL;
  const char *r = path + 1;
  size_t length = strlen(r);
  if (length >= PATH_MAX) return -ENAMETOOLONG;
  if (length > 0) {
    const char *start = r;
    for (const char *p = r;; p++) {
      if (*p != '/' && *p != '\0') continue;
      size_t n = (size_t)(p - start);
      if (n == 0 || (n == 1 && start[0] == '.') || (n == 2 && start[0] == '.' && start[1] == '.')) return -EINVAL;
      if (*p == '\0') break;
      start = p + 1;
    }
  }
  *rel = r;
  *level = path_level(r);
  return 0;
}

/* Opens a directory below DIR as O_PATH, following no symlink on the way; -errno on failure. */
static int open_beneath(const char *dir) {
  struct open_how how = {
      .flags = O_PATH | O_DIRECTORY | O_CLOEXEC,
      .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
  };
  for (int attempt = 0;; attempt++) {
    long fd = syscall(SYS_openat2, root_fd, dir, &how, sizeof how);
    if (fd >= 0) return (int)fd;
    /* EAGAIN: a rename raced the lookup (openat2(2)); it is safe to retry. */
    if ((errno != EAGAIN && errno != EINTR) || attempt == 16) return -errno;
  }
}

/*
 * Opens the parent directory of `rel` (not the root) and points *name at its last component.
 * The caller closes the returned fd.
 */
static int open_parent(const char *rel, const char **name) {
  const char *slash = strrchr(rel, '/');
  if (slash == NULL) {
    *name = rel;
    return open_beneath(".");
  }
  char parent[PATH_MAX];
  size_t length = (size_t)(slash - rel);
  memcpy(parent, rel, length);
  parent[length] = '\0';
  *name = slash + 1;
  return open_beneath(parent);
}

/* O_PATH fd of the entry itself, never following it when it is a symlink. */
static int open_node(const char *rel) {
  if (*rel == '\0') {
    int fd = openat(root_fd, ".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
  }
  const char *name;
  int parent = open_parent(rel, &name);
  if (parent < 0) return parent;
  int fd = openat(parent, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  int err = errno;
  close(parent);
  return fd < 0 ? -err : fd;
}

/* Reopens an O_PATH fd with real access flags (open(2), O_PATH: the /proc/self/fd route). */
static int reopen(int path_fd, int flags) {
  char proc[64];
  snprintf(proc, sizeof proc, "/proc/self/fd/%d", path_fd);
  int fd = open(proc, flags | O_CLOEXEC | O_NOCTTY);
  return fd < 0 ? -errno : fd;
}

static int lstat_rel(const char *rel, struct stat *st) {
  if (*rel == '\0') return fstat(root_fd, st) < 0 ? -errno : 0;
  const char *name;
  int parent = open_parent(rel, &name);
  if (parent < 0) return parent;
  int result = fstatat(parent, name, st, AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
  close(parent);
  return result;
}

/* Opens a regular file below DIR with `flags` (an access mode and O_TRUNC/O_APPEND/sync flags). */
static int open_regular(const char *rel, int flags) {
  int node = open_node(rel);
  if (node < 0) return node;
  struct stat st;
  int result;
  if (fstat(node, &st) < 0) result = -errno;
  else if (S_ISDIR(st.st_mode)) result = -EISDIR;
  else if (S_ISLNK(st.st_mode)) result = -ELOOP; /* only if it changed since the kernel's lookup */
  else if (!S_ISREG(st.st_mode)) result = -EACCES; /* FIFOs and devices: never opened by the daemon */
  else result = reopen(node, flags);
  close(node);
  return result;
}

/* The attributes the sandbox sees: its own ids as owner, write (and for view, read) bits off. */
static void present(struct stat *st, enum level level) {
  st->st_uid = view_uid;
  st->st_gid = view_gid;
  if (S_ISLNK(st->st_mode)) return; /* Linux ignores a symlink's mode; ls shows rwxrwxrwx */
  if (level < LEVEL_WRITE) st->st_mode &= ~(mode_t)(S_IWUSR | S_IWGRP | S_IWOTH);
  if (level == LEVEL_VIEW && !S_ISDIR(st->st_mode)) st->st_mode &= ~(mode_t)(S_IRUSR | S_IRGRP | S_IROTH);
}

static struct handle *new_handle(int fd, enum level level) {
  struct handle *h = calloc(1, sizeof *h);
  if (h) {
    h->fd = fd;
    h->level = level;
  }
  return h;
}

static struct handle *handle_of(struct fuse_file_info *fi) {
  return fi ? (struct handle *)(uintptr_t)fi->fh : NULL;
}

/* Checks that a new entry may be made at `rel`: `write` there. A hidden path is EACCES too. */
static int may_create(const char *rel, enum level level) {
  if (*rel == '\0') return -EEXIST;
  return level == LEVEL_WRITE ? 0 : -EACCES;
}

/* Checks that an existing entry may be changed: invisible ENOENT, otherwise `write` or EACCES. */
static int may_change(enum level level) {
  if (level == LEVEL_NONE) return -ENOENT;
  return level == LEVEL_WRITE ? 0 : -EACCES;
}

/* resolve() of a path that is to be changed in place: it needs `write`. */
static int resolve_changeable(const char *path, const char **rel) {
  enum level level;
  int err = resolve(path, rel, &level);
  return err ? err : may_change(level);
}

/* The parent directory (fd) of a path about to be made, which needs `write`; -errno when it may not be. */
static int parent_for_create(const char *path, const char **name, enum level *level) {
  const char *rel;
  int err = resolve(path, &rel, level);
  if (err) return err;
  err = may_create(rel, *level);
  if (err) return err;
  return open_parent(rel, name);
}

/* Gives what was just made at parent/name to OU:OG; removes it again (-errno) if that fails. */
static int own_new_entry(int parent, const char *name, int unlink_flags) {
  if (fchownat(parent, name, owner_uid, owner_gid, AT_SYMLINK_NOFOLLOW) == 0) return 0;
  int err = -errno;
  unlinkat(parent, name, unlink_flags);
  return err;
}

/* ---- FUSE operations ---- */

static void *cfs_init(struct fuse_conn_info *conn, struct fuse_config *cfg) {
  (void)conn;
  cfg->use_ino = 0;
  /* Unlink really unlinks (no .fuse_hidden files in the codebase); an open file keeps working
     through its fd because operations on a handle get a NULL path (nullpath_ok). The cost:
     fstat of an unlinked open file is ESTALE, since the kernel sends no handle with fstat. */
  cfg->hard_remove = 1;
  cfg->nullpath_ok = 1;
  cfg->entry_timeout = 1.0;
  cfg->attr_timeout = 1.0;
  cfg->negative_timeout = 0;
  return NULL;
}

static int cfs_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
  struct handle *h = handle_of(fi);
  if (path == NULL) {
    if (h == NULL || h->fd < 0) return -EBADF;
    if (fstat(h->fd, st) < 0) return -errno;
    present(st, h->level);
    return 0;
  }
  const char *rel;
  enum level level;
  int err = resolve(path, &rel, &level);
  if (err) return err;
  if (level == LEVEL_NONE) return -ENOENT;
  err = lstat_rel(rel, st);
  if (err) return err;
  present(st, level);
  return 0;
}

static int cfs_access(const char *path, int mask) {
  const char *rel;
  enum level level;
  int err = resolve(path, &rel, &level);
  if (err) return err;
  if (level == LEVEL_NONE) return -ENOENT;
  struct stat st;
  err = lstat_rel(rel, &st);
  if (err) return err;
  bool dir = S_ISDIR(st.st_mode);
  if ((mask & W_OK) && level < LEVEL_WRITE) return -EACCES;
  /* A view directory can be listed and traversed; a view file cannot be read. */
  if ((mask & R_OK) && level < (dir ? LEVEL_VIEW : LEVEL_READ)) return -EACCES;
  if ((mask & X_OK) && !dir && (level < LEVEL_READ || !(st.st_mode & (S_IXUSR | S_IXGRP | S_IXOTH)))) return -EACCES;
  return 0;
}

static int cfs_readlink(const char *path, char *buf, size_t size) {
  const char *rel;
  enum level level;
  int err = resolve(path, &rel, &level);
  if (err) return err;
  if (level == LEVEL_NONE) return -ENOENT;
  if (*rel == '\0') return -EINVAL;
  if (level < LEVEL_READ) return -EACCES;
  if (size == 0) return -EINVAL;
  const char *name;
  int parent = open_parent(rel, &name);
  if (parent < 0) return parent;
  ssize_t n = readlinkat(parent, name, buf, size - 1);
  int result = n < 0 ? -errno : 0;
  close(parent);
  if (n >= 0) buf[n] = '\0'; /* libfuse wants a NUL-terminated (possibly truncated) target */
  return result;
}

static int cfs_opendir(const char *path, struct fuse_file_info *fi) {
  const char *rel;
  enum level level;
  int err = resolve(path, &rel, &level);
  if (err) return err;
  if (level == LEVEL_NONE) return -ENOENT;
  int fd;
  if (*rel == '\0') {
    fd = openat(root_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -errno;
  } else {
    const char *name;
    int parent = open_parent(rel, &name);
    if (parent < 0) return parent;
    fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    err = errno;
    close(parent);
    if (fd < 0) return err == ELOOP ? -ENOTDIR : -err;
  }
  struct handle *h = new_handle(-1, level);
  char *copy = strdup(rel);
  DIR *dir = h && copy ? fdopendir(fd) : NULL;
  if (dir == NULL) {
    close(fd);
    free(copy);
    free(h);
    return -ENOMEM;
  }
  h->dir = dir;
  h->rel = copy;
  fi->fh = (uint64_t)(uintptr_t)h;
  return 0;
}

static int cfs_readdir(const char *path, void *buf, fuse_fill_dir_t filler, off_t offset,
                       struct fuse_file_info *fi, enum fuse_readdir_flags flags) {
  (void)path;
  (void)offset;
  (void)flags;
  struct handle *h = handle_of(fi);
  if (h == NULL || h->dir == NULL) return -EBADF;
  /* Offsets are not used (filler gets 0): libfuse asks for the whole listing at once. */
  rewinddir(h->dir);
  char child[PATH_MAX];
  for (;;) {
    errno = 0;
    struct dirent *entry = readdir(h->dir);
    if (entry == NULL) {
      if (errno) return -errno;
      break;
    }
    const char *name = entry->d_name;
    bool dots = strcmp(name, ".") == 0 || strcmp(name, "..") == 0;
    if (!dots) {
      int n = snprintf(child, sizeof child, "%s%s%s", h->rel, *h->rel ? "/" : "", name);
      if (n < 0 || (size_t)n >= sizeof child) continue;
      if (path_level(child) == LEVEL_NONE) continue;
    }
    struct stat st = {.st_ino = entry->d_ino, .st_mode = (mode_t)DTTOIF(entry->d_type)};
    if (filler(buf, name, &st, 0, 0)) break;
  }
  return 0;
}

static int cfs_releasedir(const char *path, struct fuse_file_info *fi) {
  (void)path;
  struct handle *h = handle_of(fi);
  if (h == NULL) return 0;
  if (h->dir) closedir(h->dir);
  free(h->rel);
  free(h);
  return 0;
}

/* The open(2) flags the daemon passes on; the rest (O_DIRECT, O_NOATIME...) are the kernel's. */
static int passed_flags(int flags) {
  return flags & (O_ACCMODE | O_TRUNC | O_APPEND | O_SYNC | O_DSYNC);
}

static int cfs_open(const char *path, struct fuse_file_info *fi) {
  const char *rel;
  enum level level;
  int err = resolve(path, &rel, &level);
  if (err) return err;
  if (level == LEVEL_NONE) return -ENOENT;
  if (level == LEVEL_VIEW) return -EACCES;
  bool writes = (fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC);
  if (writes && level < LEVEL_WRITE) return -EACCES;
  int fd = open_regular(rel, passed_flags(fi->flags));
  if (fd < 0) return fd;
  struct handle *h = new_handle(fd, level);
  if (h == NULL) {
    close(fd);
    return -ENOMEM;
  }
  fi->fh = (uint64_t)(uintptr_t)h;
  return 0;
}

static int cfs_create(const char *path, mode_t mode, struct fuse_file_info *fi) {
  const char *name;
  enum level level;
  int parent = parent_for_create(path, &name, &level);
  if (parent < 0) return parent;
  int err = 0;
  int flags = passed_flags(fi->flags) | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY;
  int fd = openat(parent, name, flags, mode & MODE_MASK);
  if (fd < 0) {
    err = errno;
    close(parent);
    /* The kernel's "does not exist" may be stale: without O_EXCL, open what is there now. */
    if (err == EEXIST && !(fi->flags & O_EXCL)) return cfs_open(path, fi);
    return -err;
  }
  err = own_new_entry(parent, name, 0);
  close(parent);
  if (err) {
    close(fd);
    return err;
  }
  struct handle *h = new_handle(fd, level);
  if (h == NULL) {
    close(fd);
    return -ENOMEM;
  }
  fi->fh = (uint64_t)(uintptr_t)h;
  return 0;
}

static int cfs_mknod(const char *path, mode_t mode, dev_t rdev) {
  (void)rdev;
  if (!S_ISREG(mode)) return -EPERM;
  const char *name;
  enum level level;
  int parent = parent_for_create(path, &name, &level);
  if (parent < 0) return parent;
  int err = 0;
  int fd = openat(parent, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, mode & MODE_MASK);
  if (fd < 0) err = -errno;
  else {
    close(fd);
    err = own_new_entry(parent, name, 0);
  }
  close(parent);
  return err;
}

/*
 * mkdir of a whited-out directory (HIDDEN_RMDIR_NOTE) where the rules allow making it: it is
 * shown again, with the mode asked for. 1 when that was the case, 0 when not, -errno on failure.
 */
static int revive_whiteout(const char *path, mode_t mode) {
  if (whiteout_count == 0 || path[0] != '/') return 0;
  const char *rel = path + 1;
  long index = whiteout_of(rel);
  if (index < 0 || strcmp(whiteouts[index], rel) != 0 || rules_level(rel) != LEVEL_WRITE) return 0;
  const char *name;
  int parent = open_parent(rel, &name);
  if (parent < 0) return parent;
  struct stat st;
  int err = 0;
  if (fstatat(parent, name, &st, AT_SYMLINK_NOFOLLOW) < 0) err = -errno;
  else if (!S_ISDIR(st.st_mode)) err = -EEXIST;
  else if (fchmodat(parent, name, mode & MODE_MASK, 0) < 0) err = -errno;
  close(parent);
  if (err == -ENOENT) {
    /* Gone from the host meanwhile: an ordinary mkdir makes it. */
    remove_whiteout(index);
    return 0;
  }
  if (err) return err;
  remove_whiteout(index);
  return 1;
}

static int cfs_mkdir(const char *path, mode_t mode) {
  int revived = revive_whiteout(path, mode);
  if (revived) return revived < 0 ? revived : 0;
  const char *name;
  enum level level;
  int parent = parent_for_create(path, &name, &level);
  if (parent < 0) return parent;
  int err = 0;
  if (mkdirat(parent, name, mode & MODE_MASK) < 0) err = -errno;
  else err = own_new_entry(parent, name, AT_REMOVEDIR);
  close(parent);
  return err;
}

static int cfs_symlink(const char *target, const char *path) {
  const char *name;
  enum level level;
  int parent = parent_for_create(path, &name, &level);
  if (parent < 0) return parent;
  int err = 0;
  /* The target is stored as text and never followed by the daemon, so any string will do. */
  if (symlinkat(target, parent, name) < 0) err = -errno;
  else err = own_new_entry(parent, name, 0);
  close(parent);
  return err;
}

/* Whether the directory parent/name (at `rel`) holds entries and none of them is visible here. */
static bool only_hidden_entries(int parent, const char *name, const char *rel) {
  int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return false;
  DIR *dir = fdopendir(fd);
  if (dir == NULL) {
    close(fd);
    return false;
  }
  bool hidden_only = true;
  char child[PATH_MAX];
  for (struct dirent *entry; hidden_only && (entry = readdir(dir)) != NULL;) {
    if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
    int n = snprintf(child, sizeof child, "%s/%s", rel, entry->d_name);
    if (n < 0 || (size_t)n >= sizeof child || path_level(child) != LEVEL_NONE) hidden_only = false;
  }
  closedir(dir);
  return hidden_only;
}

static int remove_entry(const char *path, int flags) {
  const char *rel;
  enum level level;
  int err = resolve(path, &rel, &level);
  if (err) return err;
  if (level == LEVEL_NONE) return -ENOENT;
  if (*rel == '\0') return -EBUSY;
  err = may_change(level);
  if (err) return err;
  const char *name;
  int parent = open_parent(rel, &name);
  if (parent < 0) return parent;
  err = unlinkat(parent, name, flags) < 0 ? -errno : 0;
  if (err == -ENOTEMPTY && (flags & AT_REMOVEDIR) && only_hidden_entries(parent, name, rel) && whiteout_count < WHITEOUTS_MAX) {
    char *copy = strdup(rel);
    if (copy != NULL) {
      whiteouts[whiteout_count++] = copy;
      err = 0;
    }
  }
  close(parent);
  return err;
}

static int cfs_unlink(const char *path) { return remove_entry(path, 0); }

static int cfs_rmdir(const char *path) { return remove_entry(path, AT_REMOVEDIR); }

static int cfs_rename(const char *from, const char *to, unsigned int flags) {
  if (flags & ~(unsigned int)(RENAME_NOREPLACE | RENAME_EXCHANGE)) return -EINVAL;
  const char *from_rel, *to_rel;
  enum level from_level, to_level;
  int err = resolve(from, &from_rel, &from_level);
  if (err) return err;
  err = resolve(to, &to_rel, &to_level);
  if (err) return err;
  if (from_level == LEVEL_NONE) return -ENOENT;
  if (*from_rel == '\0' || *to_rel == '\0') return -EBUSY;
  struct stat st;
  err = lstat_rel(from_rel, &st);
  if (err) return err;
  /* Directories never move (see the top of the file); EXDEV makes mv copy and delete instead. */
  if (S_ISDIR(st.st_mode)) return -EXDEV;
  if (flags & RENAME_EXCHANGE) {
    if (to_level == LEVEL_NONE) return -ENOENT;
    err = lstat_rel(to_rel, &st);
    if (err) return err;
    if (S_ISDIR(st.st_mode)) return -EXDEV;
  }
  if (from_level < LEVEL_WRITE || to_level < LEVEL_WRITE) return -EACCES;
  const char *from_name, *to_name;
  int from_parent = open_parent(from_rel, &from_name);
  if (from_parent < 0) return from_parent;
  int to_parent = open_parent(to_rel, &to_name);
  if (to_parent < 0) {
    close(from_parent);
    return to_parent;
  }
  err = renameat2(from_parent, from_name, to_parent, to_name, flags) < 0 ? -errno : 0;
  close(from_parent);
  close(to_parent);
  return err;
}

static int cfs_link(const char *from, const char *to) {
  (void)from;
  (void)to;
  return -EPERM; /* a hard link would give a second path, with its own level, to the same file */
}

static int cfs_chmod(const char *path, mode_t mode, struct fuse_file_info *fi) {
  struct handle *h = handle_of(fi);
  if (path == NULL) {
    if (h == NULL || h->fd < 0) return -EBADF;
    if (h->level < LEVEL_WRITE) return -EACCES;
    return fchmod(h->fd, mode & MODE_MASK) < 0 ? -errno : 0;
  }
  const char *rel;
  int err = resolve_changeable(path, &rel);
  if (err) return err;
  int node = open_node(rel);
  if (node < 0) return node;
  struct stat st;
  char proc[64];
  snprintf(proc, sizeof proc, "/proc/self/fd/%d", node);
  /* Linux has no lchmod (fchmodat(AT_SYMLINK_NOFOLLOW) is EOPNOTSUPP): a symlink is refused,
     anything else is changed through its O_PATH fd, which names exactly the inode checked. */
  if (fstat(node, &st) < 0) err = -errno;
  else if (S_ISLNK(st.st_mode)) err = -EOPNOTSUPP;
  else err = chmod(proc, mode & MODE_MASK) < 0 ? -errno : 0;
  close(node);
  return err;
}

static int cfs_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi) {
  struct handle *h = handle_of(fi);
  if (path != NULL) {
    const char *rel;
    enum level level;
    int err = resolve(path, &rel, &level);
    if (err) return err;
    if (level == LEVEL_NONE) return -ENOENT;
  } else if (h == NULL) {
    return -EBADF;
  }
  /* Owners are presented, not stored: "chown to who it already is" (cp -p, tar) is a no-op. */
  bool same_uid = uid == (uid_t)-1 || uid == view_uid;
  bool same_gid = gid == (gid_t)-1 || gid == view_gid;
  return same_uid && same_gid ? 0 : -EPERM;
}

static int cfs_truncate(const char *path, off_t size, struct fuse_file_info *fi) {
  struct handle *h = handle_of(fi);
  if (path == NULL || h != NULL) {
    if (h == NULL || h->fd < 0) return -EBADF;
    if (h->level < LEVEL_WRITE) return -EACCES;
    return ftruncate(h->fd, size) < 0 ? -errno : 0;
  }
  const char *rel;
  int err = resolve_changeable(path, &rel);
  if (err) return err;
  int fd = open_regular(rel, O_WRONLY);
  if (fd < 0) return fd;
  err = ftruncate(fd, size) < 0 ? -errno : 0;
  close(fd);
  return err;
}

static int cfs_utimens(const char *path, const struct timespec times[2], struct fuse_file_info *fi) {
  struct handle *h = handle_of(fi);
  if (path == NULL) {
    if (h == NULL || h->fd < 0) return -EBADF;
    if (h->level < LEVEL_WRITE) return -EACCES;
    return futimens(h->fd, times) < 0 ? -errno : 0;
  }
  const char *rel;
  int err = resolve_changeable(path, &rel);
  if (err) return err;
  if (*rel == '\0') {
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", root_fd);
    return utimensat(AT_FDCWD, proc, times, 0) < 0 ? -errno : 0;
  }
  const char *name;
  int parent = open_parent(rel, &name);
  if (parent < 0) return parent;
  err = utimensat(parent, name, times, AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
  close(parent);
  return err;
}

static int cfs_read(const char *path, char *buf, size_t size, off_t offset, struct fuse_file_info *fi) {
  (void)path;
  struct handle *h = handle_of(fi);
  if (h == NULL || h->fd < 0) return -EBADF;
  size_t done = 0;
  while (done < size) {
    ssize_t n = pread(h->fd, buf + done, size - done, offset + (off_t)done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return done > 0 ? (int)done : -errno;
    if (n == 0) break;
    done += (size_t)n;
  }
  return (int)done;
}

static int cfs_write(const char *path, const char *buf, size_t size, off_t offset, struct fuse_file_info *fi) {
  (void)path;
  struct handle *h = handle_of(fi);
  if (h == NULL || h->fd < 0) return -EBADF;
  if (h->level < LEVEL_WRITE) return -EACCES;
  size_t done = 0;
  while (done < size) {
    ssize_t n = pwrite(h->fd, buf + done, size - done, offset + (off_t)done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return done > 0 ? (int)done : -errno;
    done += (size_t)n;
  }
  return (int)done;
}

static int cfs_flush(const char *path, struct fuse_file_info *fi) {
  (void)path;
  (void)fi;
  return 0; /* the fd stays open until release; nothing is buffered in the daemon */
}

static int cfs_fsync(const char *path, int datasync, struct fuse_file_info *fi) {
  (void)path;
  struct handle *h = handle_of(fi);
  if (h == NULL || h->fd < 0) return -EBADF;
  return (datasync ? fdatasync(h->fd) : fsync(h->fd)) < 0 ? -errno : 0;
}

static int cfs_release(const char *path, struct fuse_file_info *fi) {
  (void)path;
  struct handle *h = handle_of(fi);
  if (h == NULL) return 0;
  if (h->fd >= 0) close(h->fd);
  free(h);
  return 0;
}

static int cfs_statfs(const char *path, struct statvfs *st) {
  (void)path;
  return fstatvfs(root_fd, st) < 0 ? -errno : 0;
}

static const struct fuse_operations operations = {
    .init = cfs_init,
    .getattr = cfs_getattr,
    .access = cfs_access,
    .readlink = cfs_readlink,
    .opendir = cfs_opendir,
    .readdir = cfs_readdir,
    .releasedir = cfs_releasedir,
    .open = cfs_open,
    .create = cfs_create,
    .mknod = cfs_mknod,
    .mkdir = cfs_mkdir,
    .symlink = cfs_symlink,
    .unlink = cfs_unlink,
    .rmdir = cfs_rmdir,
    .rename = cfs_rename,
    .link = cfs_link,
    .chmod = cfs_chmod,
    .chown = cfs_chown,
    .truncate = cfs_truncate,
    .utimens = cfs_utimens,
    .read = cfs_read,
    .write = cfs_write,
    .flush = cfs_flush,
    .fsync = cfs_fsync,
    .release = cfs_release,
    .statfs = cfs_statfs,
};

/* ---- Command line ---- */

static void usage_error(const char *problem) {
  fprintf(stderr,
          "codebase-fs: %s (usage: codebase-fs --source DIR --mount MNT --rules FILE --uid U --gid G "
          "--owner-uid OU --owner-gid OG)\n",
          problem);
  exit(2);
}

/* A host id: a decimal number below 2^32 - 1 ((uid_t)-1 means "unchanged" to chown). */
static unsigned int parse_id(const char *option, const char *text) {
  char *end;
  errno = 0;
  unsigned long long value = strtoull(text, &end, 10);
  if (errno || end == text || *end != '\0' || text[0] == '-' || value >= 0xFFFFFFFFULL) {
    char problem[128];
    snprintf(problem, sizeof problem, "--%s must be a numeric id, not '%.40s'", option, text);
    usage_error(problem);
  }
  return (unsigned int)value;
}

int main(int argc, char **argv) {
  enum { SOURCE, MOUNT, RULES, UID, GID, OWNER_UID, OWNER_GID, OPTION_COUNT };
  static const struct option options[] = {
      {"source", required_argument, NULL, SOURCE},       {"mount", required_argument, NULL, MOUNT},
      {"rules", required_argument, NULL, RULES},         {"uid", required_argument, NULL, UID},
      {"gid", required_argument, NULL, GID},             {"owner-uid", required_argument, NULL, OWNER_UID},
      {"owner-gid", required_argument, NULL, OWNER_GID}, {NULL, 0, NULL, 0},
  };
  const char *values[OPTION_COUNT] = {NULL};
  opterr = 0;
  int option;
  while ((option = getopt_long(argc, argv, "", options, NULL)) != -1) {
    if (option < 0 || option >= OPTION_COUNT) {
      char problem[128];
      snprintf(problem, sizeof problem, "unknown option or missing value: '%.40s'", argv[optind - 1]);
      usage_error(problem);
    }
    if (values[option]) {
      char problem[64];
      snprintf(problem, sizeof problem, "--%s given twice", options[option].name);
      usage_error(problem);
    }
    values[option] = optarg;
  }
  if (optind < argc) usage_error("unexpected argument");
  for (int i = 0; i < OPTION_COUNT; i++)
    if (values[i] == NULL) {
      char problem[64];
      snprintf(problem, sizeof problem, "--%s is required", options[i].name);
      usage_error(problem);
    }
  view_uid = parse_id("uid", values[UID]);
  view_gid = parse_id("gid", values[GID]);
  owner_uid = parse_id("owner-uid", values[OWNER_UID]);
  owner_gid = parse_id("owner-gid", values[OWNER_GID]);
  load_rules(values[RULES]);

  root_fd = open(values[SOURCE], O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (root_fd < 0) {
    if (errno == ENOTDIR) fprintf(stderr, "codebase-fs: source %s is not a directory\n", values[SOURCE]);
    else fprintf(stderr, "codebase-fs: cannot open source %s: %s\n", values[SOURCE], strerror(errno));
    return 1;
  }
  /* Absolute, because libfuse unmounts by the path it was given and the daemon moves to "/". */
  char *mount_point = realpath(values[MOUNT], NULL);
  struct stat st;
  if (mount_point == NULL || stat(mount_point, &st) < 0 || !S_ISDIR(st.st_mode)) {
    fprintf(stderr, "codebase-fs: mount point %s is not a directory\n", values[MOUNT]);
    return 1;
  }
  /* Modes come from the sandbox's requests (the kernel has applied its umask already). */
  umask(0);

  char *fuse_argv[] = {argv[0], "-o", "allow_other,fsname=cubicle-codebase", NULL};
  struct fuse_args args = FUSE_ARGS_INIT(3, fuse_argv);
  struct fuse *fuse = fuse_new(&args, &operations, sizeof operations, NULL);
  if (fuse == NULL) {
    fprintf(stderr, "codebase-fs: cannot set up FUSE\n");
    return 1;
  }
  if (fuse_mount(fuse, mount_point) != 0) {
    fprintf(stderr, "codebase-fs: cannot mount on %s (is /dev/fuse there, and is this root?)\n", mount_point);
    fuse_destroy(fuse);
    return 1;
  }
  struct fuse_session *session = fuse_get_session(fuse);
  if (fuse_set_signal_handlers(session) != 0) {
    fprintf(stderr, "codebase-fs: cannot install signal handlers\n");
    fuse_unmount(fuse);
    fuse_destroy(fuse);
    return 1;
  }
  if (chdir("/") < 0) {
    /* Only so the daemon's cwd pins nothing; not worth failing over. */
  }
  /* Requests wait in the kernel until the loop below reads them, so the mount is usable now. */
  printf("ready\n");
  fflush(stdout);
  /* 0 when MNT was unmounted, the signal number after SIGTERM/SIGINT/SIGHUP (a requested stop
     too), a negative errno when reading /dev/fuse failed. */
  int result = fuse_loop(fuse);
  fuse_remove_signal_handlers(session);
  fuse_unmount(fuse);
  fuse_destroy(fuse);
  fuse_opt_free_args(&args);
  free(mount_point);
  if (result < 0) {
    fprintf(stderr, "codebase-fs: FUSE session failed: %s\n", strerror(-result));
    return 1;
  }
  return 0;
}
