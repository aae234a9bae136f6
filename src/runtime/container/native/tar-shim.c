/*
 * tar-shim: the `tar` CRIU finds first in PATH when it archives or restores a sandbox's tmpfs
 * mounts (TAR_SHIM_NOTE in src/runtime/container/criu.ts). Starting GNU tar was the expensive
 * part of a dump (three tmpfs mounts, one tar each), so the shim archives and extracts what CRIU
 * asks for itself, and execs the real tar (CUBICLE_REAL_TAR) for everything else, with the old
 * rewrite: `--gzip` dropped, an extraction reads the archive through /proc/self/fd/0 so GNU tar
 * recognises a gzip archive (images made before the shim) by itself.
 *
 * CRIU 4.2.1 (criu/filesystems.c tmpfs_dump, tmpfs_restore) runs exactly:
 *   tar --create --gzip --no-unquote --no-wildcards --one-file-system --check-links
 *       --preserve-permissions --sparse --numeric-owner --directory /proc/self/fd/0 .
 *     (stdin: the tmpfs root directory, stdout: the image file)
 *   tar --extract --gzip --no-unquote --no-wildcards --directory <mount point>
 *     (stdin: the image file)
 * Any other argv goes to the real tar. So does, before a byte is written:
 * - create: a sparse regular file (st_blocks * 512 < st_size, which --sparse would encode), a
 *   socket, a number that does not fit GNU tar's octal fields, a tree deeper than MAX_DEPTH;
 * - extract: anything but a regular file on stdin, a compressed or non-GNU/ustar archive, a bad
 *   checksum, an entry type other than file/hard link/symlink/char/block/directory/FIFO and
 *   GNU long names ('L'/'K'), an owner name (only --numeric-owner archives are ours), and any
 *   member or hard link target that is absolute or has a `..` component (GNU tar rewrites or
 *   skips those with its own warnings; it is simplest to let it).
 * The archive format is GNU tar's default ("gnu": ustar header with the "ustar  " magic, 'L'/'K'
 * entries for names and link targets over 100 bytes, numeric owners, no user/group names).
 * Extraction follows GNU tar run as root: owners (lchown), then modes (after the owner, so setuid
 * bits stay), then mtimes (atime is now); directories get theirs last, deepest first, "./"
 * included (it is the --directory itself). Every path is resolved below the directory with
 * openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS), so a symlink in the archive cannot lead a
 * later member outside. A failing member (e.g. mknod of a device in a user namespace) is reported
 * on stderr and skipped, and the exit status is 2, as GNU tar does.
 *
 * CUBICLE_TAR_NATIVE=0 in the environment always execs the real tar (for measurements).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 512
#define RECORD (20 * BLOCK) /* GNU tar's default blocking factor */
#define MAX_DEPTH 128
#define MAX_NAME 4096
#define OCTAL7_MAX 07777777ULL
#define OCTAL11_MAX 077777777777ULL

static const char *real_tar;
static int argc_saved;
static char **argv_saved;

/* Execs the real tar with the old rewrite; on an extraction, the archive is read from its start. */
static void fallback(void) {
  int extract = 0;
  for (int i = 1; i < argc_saved; i++)
    if (strcmp(argv_saved[i], "--extract") == 0) extract = 1;
  if (extract) lseek(0, 0, SEEK_SET);
  char **args = calloc((size_t)argc_saved + 2, sizeof *args);
  if (!args) _exit(2);
  int n = 0;
  args[n++] = (char *)real_tar;
  if (extract) args[n++] = "--file=/proc/self/fd/0";
  for (int i = 1; i < argc_saved; i++)
    if (strcmp(argv_saved[i], "--gzip") != 0) args[n++] = argv_saved[i];
  args[n] = NULL;
  execv(real_tar, args);
  fprintf(stderr, "tar-shim: cannot execute %s: %s\n", real_tar, strerror(errno));
  _exit(2);
}

static int failed; /* a member could not be archived or extracted: exit status 2 */

static void warn_member(const char *what, const char *name, int err) {
  fprintf(stderr, "tar-shim: %s: %s: %s\n", name, what, strerror(err));
  failed = 1;
}

static void *xmalloc(size_t size) {
  void *p = malloc(size);
  if (!p) {
    fprintf(stderr, "tar-shim: out of memory\n");
    _exit(2);
  }
  return p;
}

/* ---- Output: a buffer in front of stdout ---- */

static char out_buffer[1 << 16];
static size_t out_used;
static unsigned long long out_total;

static void out_flush(void) {
  size_t done = 0;
  while (done < out_used) {
    ssize_t n = write(1, out_buffer + done, out_used - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      fprintf(stderr, "tar-shim: cannot write the archive: %s\n", strerror(n < 0 ? errno : EIO));
      _exit(2);
    }
    done += (size_t)n;
  }
  out_used = 0;
}

static void out_write(const void *data, size_t size) {
  out_total += size;
  while (size > 0) {
    size_t room = sizeof out_buffer - out_used;
    size_t chunk = size < room ? size : room;
    memcpy(out_buffer + out_used, data, chunk);
    out_used += chunk;
    data = (const char *)data + chunk;
    size -= chunk;
    if (out_used == sizeof out_buffer) out_flush();
  }
}

static void out_zeros(size_t size) {
  static const char zeros[BLOCK];
  while (size > 0) {
    size_t chunk = size < BLOCK ? size : BLOCK;
    out_write(zeros, chunk);
    size -= chunk;
  }
}

/* Copies `size` bytes of `fd` to the archive: copy_file_range, else sendfile, else read/write. */
static int out_copy_file(int fd, unsigned long long size) {
  out_flush();
  unsigned long long left = size;
  int mode = 0; /* 0: copy_file_range, 1: sendfile, 2: read/write */
  while (left > 0) {
    size_t chunk = left > (1ULL << 30) ? (1U << 30) : (size_t)left;
    ssize_t n;
    if (mode == 0) {
      n = copy_file_range(fd, NULL, 1, NULL, chunk, 0);
      if (n < 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP || errno == EBADF)) {
        mode = 1;
        continue;
      }
    } else if (mode == 1) {
      n = sendfile(1, fd, NULL, chunk);
      if (n < 0 && (errno == EINVAL || errno == ENOSYS)) {
        mode = 2;
        continue;
      }
    } else {
      n = read(fd, out_buffer, chunk < sizeof out_buffer ? chunk : sizeof out_buffer);
      if (n > 0) {
        out_used = (size_t)n;
        out_flush();
      }
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -1;
    if (n == 0) break; /* the file shrank: pad with zeros, as GNU tar does */
    left -= (unsigned long long)n;
  }
  out_total += size;
  if (left > 0) {
    out_total -= left;
    out_zeros((size_t)left);
    errno = ENODATA;
    return -1;
  }
  return 0;
}

/* ---- Create ---- */

struct member {
  char *name;    /* "./a/b" as GNU tar names it ("./" for the root, "/" after a directory) */
  struct stat st;
  char *target;  /* symlink target, or the member this one is a hard link of */
  char type;
};

static struct member *members;
static size_t member_count, member_capacity;

static struct member *add_member(void) {
  if (member_count == member_capacity) {
    member_capacity = member_capacity ? member_capacity * 2 : 64;
    members = realloc(members, member_capacity * sizeof *members);
    if (!members) {
      fprintf(stderr, "tar-shim: out of memory\n");
      _exit(2);
    }
  }
  struct member *m = &members[member_count++];
  memset(m, 0, sizeof *m);
  return m;
}

/* An earlier member with this inode when it has more than one link (GNU tar's hard links). */
static const char *find_link(const struct stat *st) {
  for (size_t i = 0; i + 1 < member_count; i++) {
    const struct member *m = &members[i];
    if (m->type != '5' && m->type != '1' && m->st.st_nlink > 1 && m->st.st_ino == st->st_ino && m->st.st_dev == st->st_dev)
      return m->name;
  }
  return NULL;
}

static int fits(const struct stat *st) {
  return (unsigned long long)st->st_uid <= OCTAL7_MAX && (unsigned long long)st->st_gid <= OCTAL7_MAX &&
         st->st_mtime >= 0 && (unsigned long long)st->st_mtime <= OCTAL11_MAX &&
         (unsigned long long)st->st_size <= OCTAL11_MAX && major(st->st_rdev) <= OCTAL7_MAX && minor(st->st_rdev) <= OCTAL7_MAX;
}

/*
 * Lists the tree below `dirfd` (named `prefix`) into `members`. Returns 0, or -1 when the whole
 * archive should be made by the real tar.
 */
static int walk(int dirfd, const char *prefix, dev_t root_dev, int depth) {
  if (depth > MAX_DEPTH) return -1;
  DIR *dir = fdopendir(dirfd);
  if (!dir) return -1;
  struct dirent *entry;
  int result = 0;
  while (result == 0 && (errno = 0, entry = readdir(dir)) != NULL) {
    if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
    size_t length = strlen(prefix) + strlen(entry->d_name) + 2;
    if (length > MAX_NAME) return closedir(dir), -1;
    struct member *m = add_member();
    if (fstatat(dirfd, entry->d_name, &m->st, AT_SYMLINK_NOFOLLOW) < 0 || !fits(&m->st)) {
      result = -1;
      break;
    }
    m->name = xmalloc(length);
    snprintf(m->name, length, "%s%s", prefix, entry->d_name);
    mode_t kind = m->st.st_mode & S_IFMT;
    const char *link = kind != S_IFDIR && m->st.st_nlink > 1 ? find_link(&m->st) : NULL;
    if (link) {
      m->type = '1';
      m->target = strdup(link);
    } else if (kind == S_IFREG) {
      m->type = '0';
      if (m->st.st_size > 0 && (unsigned long long)m->st.st_blocks * 512 < (unsigned long long)m->st.st_size) result = -1;
    } else if (kind == S_IFLNK) {
      m->type = '2';
      m->target = xmalloc(MAX_NAME);
      ssize_t n = readlinkat(dirfd, entry->d_name, m->target, MAX_NAME - 1);
      if (n < 0 || n >= MAX_NAME - 1) result = -1;
      else m->target[n] = 0;
    } else if (kind == S_IFCHR) {
      m->type = '3';
    } else if (kind == S_IFBLK) {
      m->type = '4';
    } else if (kind == S_IFIFO) {
      m->type = '6';
    } else if (kind == S_IFDIR) {
      m->type = '5';
      strcat(m->name, "/");
      /* --one-file-system: a mount point's directory is archived, not what is mounted there. */
      if (m->st.st_dev != root_dev) continue;
      int child = openat(dirfd, entry->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (child < 0) {
        result = -1;
        break;
      }
      char *child_prefix = strdup(m->name);
      if (!child_prefix) _exit(2);
      result = walk(child, child_prefix, root_dev, depth + 1);
      free(child_prefix);
    } else {
      result = -1; /* a socket: GNU tar says "socket ignored" */
    }
  }
  if (result == 0 && errno != 0) result = -1;
  closedir(dir);
  return result;
}

/* `size - 1` zero-padded octal digits and a NUL (fits() checked that the value fits). */
static void octal(char *field, size_t size, unsigned long long value) {
  field[size - 1] = 0;
  for (size_t i = size - 1; i-- > 0; value >>= 3) field[i] = (char)('0' + (value & 7));
}

/* One header block (GNU format). */
static void write_header(const char *name, char type, const struct stat *st, unsigned long long size, const char *linkname) {
  char h[BLOCK];
  memset(h, 0, sizeof h);
  strncpy(h, name, 100);
  octal(h + 100, 8, st ? st->st_mode & 07777 : 0);
  octal(h + 108, 8, st ? st->st_uid : 0);
  octal(h + 116, 8, st ? st->st_gid : 0);
  octal(h + 124, 12, size);
  octal(h + 136, 12, st ? (unsigned long long)st->st_mtime : 0);
  h[156] = type;
  if (linkname) strncpy(h + 157, linkname, 100);
  memcpy(h + 257, "ustar  ", 8); /* GNU magic and version: "ustar  \0" */
  if (st && (type == '3' || type == '4')) {
    octal(h + 329, 8, major(st->st_rdev));
    octal(h + 337, 8, minor(st->st_rdev));
  }
  memset(h + 148, ' ', 8);
  unsigned sum = 0;
  for (int i = 0; i < BLOCK; i++) sum += (unsigned char)h[i];
  octal(h + 148, 7, sum); /* six digits, NUL, space */
  h[155] = ' ';
  out_write(h, sizeof h);
}

/* A GNU long name ('L') or long link target ('K') entry, then padding. */
static void write_long(char type, const char *value) {
  size_t size = strlen(value) + 1;
  write_header("././@LongLink", type, NULL, size, NULL);
  out_write(value, size);
  out_zeros((BLOCK - size % BLOCK) % BLOCK);
}

static int create(const char *directory) {
  int root = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (root < 0) fallback();
  struct member *top = add_member();
  if (fstat(root, &top->st) < 0 || !fits(&top->st)) fallback();
  top->name = strdup("./");
  top->type = '5';
  int walker = dup(root);
  if (walker < 0 || walk(walker, "./", top->st.st_dev, 0) < 0) fallback();

  for (size_t i = 0; i < member_count; i++) {
    struct member *m = &members[i];
    if (strlen(m->name) > 100) write_long('L', m->name);
    if (m->target && strlen(m->target) > 100) write_long('K', m->target);
    unsigned long long size = m->type == '0' ? (unsigned long long)m->st.st_size : 0;
    write_header(m->name, m->type, &m->st, size, m->target);
    if (m->type != '0' || size == 0) continue;
    int fd = openat(root, m->name + 2, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
      warn_member("Cannot open", m->name, errno);
      out_zeros((size_t)size); /* keep the archive readable */
    } else {
      if (out_copy_file(fd, size) < 0) warn_member("Cannot read", m->name, errno);
      close(fd);
    }
    out_zeros((BLOCK - size % BLOCK) % BLOCK);
  }
  out_zeros(2 * BLOCK);
  out_zeros((RECORD - out_total % RECORD) % RECORD);
  out_flush();
  return failed ? 2 : 0;
}

/* ---- Extract ---- */

struct entry {
  char type;
  char *name;    /* relative to the directory, no "./", no trailing "/"; "" is the directory */
  char *linkname;
  mode_t mode;
  uid_t uid;
  gid_t gid;
  time_t mtime;
  dev_t rdev;
  unsigned long long size;
  off_t data; /* offset of the contents in the archive */
};

static int parse_octal(const char *field, size_t size, unsigned long long *value) {
  size_t i = 0;
  while (i < size && field[i] == ' ') i++;
  if (i < size && ((unsigned char)field[i] & 0x80)) return -1; /* base-256 */
  unsigned long long v = 0;
  int digits = 0;
  for (; i < size && field[i] >= '0' && field[i] <= '7'; i++, digits++) {
    if (v > (OCTAL11_MAX << 3)) return -1;
    v = v * 8 + (unsigned long long)(field[i] - '0');
  }
  for (; i < size; i++)
    if (field[i] != ' ' && field[i] != 0) return -1;
  (void)digits; /* an all-blank field is 0, as GNU tar reads it */
  *value = v;
  return 0;
}

/* Whether a member path is one GNU tar would rewrite or refuse: absolute, or with "..". */
static int unsafe_path(const char *path) {
  if (path[0] == '/') return 1;
  for (const char *p = path; *p;) {
    const char *end = strchr(p, '/');
    size_t length = end ? (size_t)(end - p) : strlen(p);
    if (length == 2 && p[0] == '.' && p[1] == '.') return 1;
    if (!end) break;
    p = end + 1;
  }
  return 0;
}

/* "./a//b/./c/" -> "a/b/c" in place. */
static void normalize(char *path) {
  char *out = path;
  for (char *p = path; *p;) {
    char *end = strchr(p, '/');
    size_t length = end ? (size_t)(end - p) : strlen(p);
    if (!(length == 0 || (length == 1 && p[0] == '.'))) {
      if (out != path) *out++ = '/';
      memmove(out, p, length);
      out += length;
    }
    if (!end) break;
    p = end + 1;
  }
  *out = 0;
}

static int read_at(void *buffer, size_t size, off_t offset) {
  size_t done = 0;
  while (done < size) {
    ssize_t n = pread(0, (char *)buffer + done, size - done, offset + (off_t)done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return -1;
    done += (size_t)n;
  }
  return 0;
}

static char *read_long(off_t offset, unsigned long long size) {
  if (size == 0 || size > MAX_NAME) return NULL;
  char *value = xmalloc((size_t)size + 1);
  if (read_at(value, (size_t)size, offset) < 0) return free(value), NULL;
  value[size] = 0;
  return value;
}

static struct entry *entries;
static size_t entry_count;

/* Reads every header (skipping contents); -1 when the real tar should extract this archive. */
static int scan(off_t archive_size) {
  size_t capacity = 0;
  off_t offset = 0;
  char *long_name = NULL, *long_link = NULL;
  for (;;) {
    unsigned char h[BLOCK];
    if (offset + BLOCK > archive_size || read_at(h, BLOCK, offset) < 0) return -1;
    offset += BLOCK;
    int zero = 1;
    for (int i = 0; i < BLOCK; i++)
      if (h[i]) zero = 0;
    if (zero) break;
    if (memcmp(h + 257, "ustar", 5) != 0) return -1;
    unsigned long long sum, value;
    if (parse_octal((char *)h + 148, 8, &sum) < 0) return -1;
    unsigned computed = 0;
    for (int i = 0; i < BLOCK; i++) computed += (i >= 148 && i < 156) ? ' ' : h[i];
    if (computed != sum) return -1;
    char type = (char)h[156];
    unsigned long long size;
    if (parse_octal((char *)h + 124, 12, &size) < 0 || size > (unsigned long long)archive_size) return -1;
    off_t data = offset;
    offset += (off_t)((size + BLOCK - 1) / BLOCK * BLOCK);
    if (offset > archive_size) return -1;
    if (type == 'L' || type == 'K') {
      char *value_text = read_long(data, size);
      if (!value_text) return -1;
      if (type == 'L') free(long_name), long_name = value_text;
      else free(long_link), long_link = value_text;
      continue;
    }
    if (type == 0) type = '0'; /* old tar's regular file */
    if (type < '0' || type > '6') return -1;
    if (h[265] || h[297]) return -1; /* user or group name: not a --numeric-owner archive */
    if (h[345] && memcmp(h + 257, "ustar\0", 6) == 0) return -1; /* POSIX prefix field */
    if (entry_count == capacity) {
      capacity = capacity ? capacity * 2 : 64;
      entries = realloc(entries, capacity * sizeof *entries);
      if (!entries) return -1;
    }
    struct entry *e = &entries[entry_count++];
    memset(e, 0, sizeof *e);
    e->type = type;
    if (long_name) e->name = long_name, long_name = NULL;
    else e->name = strndup((char *)h, 100);
    if (type == '1' || type == '2') {
      if (long_link) e->linkname = long_link, long_link = NULL;
      else e->linkname = strndup((char *)h + 157, 100);
      if (!e->linkname || !*e->linkname) return -1;
    }
    free(long_link), long_link = NULL;
    if (!e->name || !*e->name || unsafe_path(e->name)) return -1;
    if (type == '1' && unsafe_path(e->linkname)) return -1;
    normalize(e->name);
    if (type == '1') normalize(e->linkname);
    if (parse_octal((char *)h + 100, 8, &value) < 0) return -1;
    e->mode = (mode_t)(value & 07777);
    if (parse_octal((char *)h + 108, 8, &value) < 0) return -1;
    e->uid = (uid_t)value;
    if (parse_octal((char *)h + 116, 8, &value) < 0) return -1;
    e->gid = (gid_t)value;
    if (parse_octal((char *)h + 136, 12, &value) < 0) return -1;
    e->mtime = (time_t)value;
    if (type == '3' || type == '4') {
      unsigned long long major_value, minor_value;
      if (parse_octal((char *)h + 329, 8, &major_value) < 0 || parse_octal((char *)h + 337, 8, &minor_value) < 0) return -1;
      e->rdev = makedev((unsigned)major_value, (unsigned)minor_value);
    }
    /* Only a regular file has contents here: GNU tar skips any other member's `size` bytes. */
    e->size = size;
    e->data = data;
    if (*e->name == 0 && type != '5') return -1;
  }
  return 0;
}

static int root_fd;

/* The directory holding `path` (below the root, no symlink out of it), and its last component. */
static int open_parent(const char *path, const char **base) {
  const char *slash = strrchr(path, '/');
  if (!slash) {
    *base = path;
    return dup(root_fd);
  }
  *base = slash + 1;
  char parent[MAX_NAME + 1];
  size_t length = (size_t)(slash - path);
  if (length > MAX_NAME) return errno = ENAMETOOLONG, -1;
  memcpy(parent, path, length);
  parent[length] = 0;
  struct open_how how = {.flags = O_RDONLY | O_DIRECTORY | O_CLOEXEC, .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS};
  return (int)syscall(SYS_openat2, root_fd, parent, &how, sizeof how);
}

/* GNU tar's default for an existing non-directory: remove it first. */
static void remove_existing(int dirfd, const char *base) {
  if (unlinkat(dirfd, base, 0) < 0 && (errno == EISDIR || errno == EPERM)) unlinkat(dirfd, base, AT_REMOVEDIR);
}

static void set_times(int dirfd, const char *base, time_t mtime, int flags) {
  struct timespec times[2] = {{.tv_nsec = UTIME_NOW}, {.tv_sec = mtime}};
  utimensat(dirfd, base, times, flags);
}

static void extract_one(struct entry *e) {
  const char *base;
  int dirfd = open_parent(e->name, &base);
  if (dirfd < 0) {
    warn_member("Cannot open", e->name, errno);
    return;
  }
  switch (e->type) {
  case '5':
    if (*base && mkdirat(dirfd, base, 0700) < 0) {
      struct stat st;
      if (errno != EEXIST || fstatat(dirfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISDIR(st.st_mode)) {
        if (errno == EEXIST) remove_existing(dirfd, base);
        if (mkdirat(dirfd, base, 0700) < 0) warn_member("Cannot mkdir", e->name, errno);
      }
    }
    break; /* owner, mode, mtime: at the end (finish_directories) */
  case '0': {
    remove_existing(dirfd, base);
    int fd = openat(dirfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
      warn_member("Cannot open", e->name, errno);
      break;
    }
    off_t offset = e->data;
    unsigned long long left = e->size;
    while (left > 0) {
      size_t chunk = left > (1ULL << 30) ? (1U << 30) : (size_t)left;
      ssize_t n = copy_file_range(0, &offset, fd, NULL, chunk, 0);
      if (n < 0 && errno != EINTR) n = sendfile(fd, 0, &offset, chunk);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        warn_member("Cannot write", e->name, n < 0 ? errno : EIO);
        break;
      }
      left -= (unsigned long long)n;
    }
    if (fchown(fd, e->uid, e->gid) < 0) warn_member("Cannot change ownership", e->name, errno);
    if (fchmod(fd, e->mode) < 0) warn_member("Cannot change mode", e->name, errno);
    struct timespec times[2] = {{.tv_nsec = UTIME_NOW}, {.tv_sec = e->mtime}};
    futimens(fd, times);
    close(fd);
    break;
  }
  case '1': {
    const char *target_base;
    int target_dir = open_parent(e->linkname, &target_base);
    if (target_dir < 0) {
      warn_member("Cannot hard link", e->name, errno);
      break;
    }
    remove_existing(dirfd, base);
    if (linkat(target_dir, target_base, dirfd, base, 0) < 0) warn_member("Cannot hard link", e->name, errno);
    close(target_dir);
    break;
  }
  case '2':
    remove_existing(dirfd, base);
    if (symlinkat(e->linkname, dirfd, base) < 0) {
      warn_member("Cannot create symlink", e->name, errno);
      break;
    }
    if (fchownat(dirfd, base, e->uid, e->gid, AT_SYMLINK_NOFOLLOW) < 0) warn_member("Cannot change ownership", e->name, errno);
    set_times(dirfd, base, e->mtime, AT_SYMLINK_NOFOLLOW);
    break;
  default: { /* '3', '4', '6' */
    mode_t kind = e->type == '3' ? S_IFCHR : e->type == '4' ? S_IFBLK : S_IFIFO;
    remove_existing(dirfd, base);
    if (mknodat(dirfd, base, kind | (e->mode & 0777 & ~07000), e->rdev) < 0) {
      warn_member("Cannot mknod", e->name, errno);
      break;
    }
    if (fchownat(dirfd, base, e->uid, e->gid, AT_SYMLINK_NOFOLLOW) < 0) warn_member("Cannot change ownership", e->name, errno);
    if (fchmodat(dirfd, base, e->mode, 0) < 0) warn_member("Cannot change mode", e->name, errno);
    set_times(dirfd, base, e->mtime, AT_SYMLINK_NOFOLLOW);
  }
  }
  close(dirfd);
}

/* Directories' owners, modes and mtimes, deepest (latest) first, after everything inside. */
static void finish_directories(void) {
  for (size_t i = entry_count; i-- > 0;) {
    struct entry *e = &entries[i];
    if (e->type != '5') continue;
    int fd;
    if (*e->name == 0) {
      fd = dup(root_fd);
    } else {
      struct open_how how = {.flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS};
      fd = (int)syscall(SYS_openat2, root_fd, e->name, &how, sizeof how);
    }
    if (fd < 0) continue; /* reported when it was made */
    if (fchown(fd, e->uid, e->gid) < 0) warn_member("Cannot change ownership", *e->name ? e->name : ".", errno);
    if (fchmod(fd, e->mode) < 0) warn_member("Cannot change mode", *e->name ? e->name : ".", errno);
    struct timespec times[2] = {{.tv_nsec = UTIME_NOW}, {.tv_sec = e->mtime}};
    futimens(fd, times);
    close(fd);
  }
}

static int extract(const char *directory) {
  struct stat st;
  if (fstat(0, &st) < 0 || !S_ISREG(st.st_mode)) fallback();
  if (scan(st.st_size) < 0) fallback();
  root_fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (root_fd < 0) fallback();
  umask(0);
  for (size_t i = 0; i < entry_count; i++) extract_one(&entries[i]);
  finish_directories();
  if (failed) fprintf(stderr, "tar-shim: Exiting with failure status due to previous errors\n");
  return failed ? 2 : 0;
}

/* Whether argv is exactly what CRIU runs (see the top), in any order; sets *directory. */
static int criu_argv(int argc, char **argv, int *mode, const char **directory) {
  static const char *const common[] = {"--gzip", "--no-unquote", "--no-wildcards"};
  static const char *const create_only[] = {"--one-file-system", "--check-links", "--preserve-permissions", "--sparse", "--numeric-owner"};
  int seen_dot = 0, seen_create_only = 0;
  *mode = 0;
  *directory = NULL;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    int known = 0;
    for (size_t k = 0; k < sizeof common / sizeof *common; k++) known |= strcmp(a, common[k]) == 0;
    for (size_t k = 0; k < sizeof create_only / sizeof *create_only; k++)
      if (strcmp(a, create_only[k]) == 0) known = 1, seen_create_only = 1;
    if (known) continue;
    if (strcmp(a, "--create") == 0 && !*mode) *mode = 'c';
    else if (strcmp(a, "--extract") == 0 && !*mode) *mode = 'x';
    else if (strcmp(a, "--directory") == 0 && i + 1 < argc && !*directory) *directory = argv[++i];
    else if (strcmp(a, ".") == 0 && !seen_dot) seen_dot = 1;
    else return 0;
  }
  if (!*directory) return 0;
  if (*mode == 'c') return seen_dot;
  if (*mode == 'x') return !seen_dot && !seen_create_only;
  return 0;
}

int main(int argc, char **argv) {
  real_tar = getenv("CUBICLE_REAL_TAR");
  if (!real_tar || !*real_tar) real_tar = "/usr/bin/tar";
  argc_saved = argc;
  argv_saved = argv;
  const char *native = getenv("CUBICLE_TAR_NATIVE");
  int mode;
  const char *directory;
  if ((native && strcmp(native, "0") == 0) || !criu_argv(argc, argv, &mode, &directory)) fallback();
  return mode == 'c' ? create(directory) : extract(directory);
}
