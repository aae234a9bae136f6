/*
 * sandbox-helper: the host-side steps of a container sandbox that Node cannot make (ioctls,
 * namespaces, the new mount API), one process start per step that used to be one anyway.
 * See SANDBOX_HELPER_NOTE in src/runtime/container/sandbox-helper.ts for why each exists.
 *
 *   prepare   --base X --lower DIR --layer DIR --rootfs DIR --quota BYTES
 *             [--from IMAGE_LAYER] [--userns PIN] [--criu-images DIR --criu-view DIR]
 *             [--volumes SRC;SRC...]
 *       Makes the sandbox's writable layer (a btrfs subvolume with upper/ and work/, new or a
 *       snapshot of an image's layer) with a qgroup limit, optionally a user namespace owned
 *       by host uid X mapping 0..65535 to X..X+65535 (pinned at PIN for runc to join), and
 *       mounts the overlay root at DIR: the template (lower) and the layer are bound
 *       idmapped, canonical ids 100000+n on disk becoming X+n, so one tree serves every
 *       sandbox. With --criu-images, a view of a CRIU image for this restore: hard links to
 *       its files, its user namespace map rewritten to X. With --volumes, each SRC bound
 *       idmapped the same way at <rootfs's dir>/volumes/<n> (VOLUME_BINDS_NOTE).
 *       Prints "subvol <id>".
 *   bind-volumes --dir DIR --volumes SRC;SRC...
 *       Each SRC bound at DIR/volumes/<n>, idmapped from canonical ids to 0..65535: a
 *       microVM's volumes for its virtiofsd (MICROVM_SHARES_NOTE).
 *   snapshot  --from LAYER --to DIR
 *       A snapshot of a layer (atomic, copy-on-write) for a checkpoint image. Prints
 *       "subvol <id>".
 *   teardown  --bundle DIR [--layer DIR]
 *       Unmounts everything at or below DIR (the root, the namespace pin), deletes the layer
 *       subvolume and its qgroup.
 *   hostname  --pid P --name NAME
 *       Names the host of a running sandbox (after a CRIU restore its UTS namespace has the
 *       source's name, and the agent may not rename it).
 *   qgroup-gc --mount DIR
 *       Removes the qgroups of deleted subvolumes.
 *   watch
 *       Reads "add TAG PID" / "del TAG" lines on stdin and writes "exit TAG" when PID ends
 *       (pidfds, no polling). Ends when stdin closes.
 *   sparse-copy --from FILE --to FILE
 *       Copies a regular file to a new one (refused if it exists), holes and all-zero pages left
 *       as holes, as `cp --sparse=always` does: a microVM's RAM file into its snapshot image
 *       while the guest is stopped (MICROVM_RAM_NOTE), without a process start from Node.
 *   net-setup | net-release | net-address | net-guest-tap | net-guest-release
 *       A sandbox's network namespace and veth pair, a microVM's tap, through rtnetlink: see
 *       netlink.h.
 *   criu-dump --criu PATH --netns PATH --pid N ...
 *       A container's checkpoint through CRIU's RPC, without runc; see criu-rpc.h.
 *   flows     --subnet CIDR
 *       Long-running: the byte counts of sandboxes' UDP and ICMP flows as the kernel forgets
 *       them (conntrack events); see conntrack.h.
 *   serve
 *       Resident: runs the subcommands above (but watch and flows) and programs (`exec`: runc in a
 *       sandbox's netns) for requests on stdin, each in a forked child, concurrently, and
 *       replies with their status and output (see cmd_serve). Ends when stdin closes.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/btrfs.h>
#include <linux/btrfs_tree.h>
#include <linux/capability.h>
#include <linux/mount.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/fsuid.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <setjmp.h>
#include <time.h>
#include <unistd.h>

#define ID_COUNT 65536u
/* Template trees and layers store sandbox ids shifted to this base (SANDBOX_UID_BASE). */
#define CANONICAL_BASE 100000u

static const char *step = "start";

/*
 * Set while `serve` runs a subcommand in its own process (INLINE_NOTE): the subcommand's way
 * out is then a jump back to it with the exit status, not an exit.
 */
static jmp_buf *inline_escape;

static void leave(int status) {
  if (inline_escape) longjmp(*inline_escape, status);
  exit(status);
}

static void fail(const char *what) {
  fprintf(stderr, "sandbox-helper: %s: %s: %s\n", step, what, strerror(errno));
  leave(errno == EDQUOT || errno == ENOSPC ? 28 : 1);
}

static void usage(const char *message) {
  fprintf(stderr, "sandbox-helper: %s\n", message);
  leave(2);
}

/* --name value pairs after the subcommand. */
static const char *option(int argc, char **argv, const char *name, int required) {
  for (int i = 2; i + 1 < argc; i += 2)
    if (strcmp(argv[i], name) == 0) return argv[i + 1];
  if (required) {
    fprintf(stderr, "sandbox-helper: %s needs %s\n", argv[1], name);
    leave(2);
  }
  return NULL;
}

static unsigned long long number(const char *text, const char *name) {
  char *end;
  errno = 0;
  /* Digits only: strtoull would take "-1" as 2^64 - 1. */
  unsigned long long value = strtoull(text, &end, 10);
  if (errno || *end || !isdigit((unsigned char)*text)) {
    fprintf(stderr, "sandbox-helper: %s is not a number: %s\n", name, text);
    leave(2);
  }
  return value;
}

static void write_file(const char *path, const char *text) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) fail(path);
  ssize_t length = (ssize_t)strlen(text);
  if (write(fd, text, (size_t)length) != length) fail(path);
  close(fd);
}

static void write_maps(pid_t pid, const char *line) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/uid_map", (int)pid);
  write_file(path, line);
  snprintf(path, sizeof path, "/proc/%d/gid_map", (int)pid);
  write_file(path, line);
}

/* After an fsuid or euid change the kernel clears effective capabilities: take them back. */
static void raise_effective_caps(void) {
  struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[2];
  if (syscall(SYS_capget, &header, data) != 0) fail("capget");
  data[0].effective = data[0].permitted;
  data[1].effective = data[1].permitted;
  if (syscall(SYS_capset, &header, data) != 0) fail("capset");
}

/*
 * A user namespace whose map is `line`, created by a child running as host uid `owner` (0 =
 * as root), so that the kernel records `owner` as its owner: per-user counts of the namespace's
 * processes (inotify instances, nested namespaces …) are charged to the owner. Returns an fd.
 */
static int make_userns(uid_t owner, const char *line) {
  int ready[2], go[2];
  if (pipe2(ready, O_CLOEXEC) || pipe2(go, O_CLOEXEC)) fail("pipe");
  pid_t child = fork();
  if (child < 0) fail("fork");
  if (child == 0) {
    char byte = 0;
    /* Only the parent's close of `go` may end our wait: drop our copies of the other ends. */
    close(ready[0]);
    close(go[1]);
    if (owner != 0 && (setgroups(0, NULL) || setresgid(owner, owner, owner) || setresuid(owner, owner, owner))) _exit(3);
    if (unshare(CLONE_NEWUSER) != 0) _exit(4);
    /* A uid change made us undumpable: /proc/<pid>/ files would be root's, which is fine here. */
    if (write(ready[1], &byte, 1) != 1) _exit(5);
    if (read(go[0], &byte, 1) < 0) _exit(6);
    _exit(0);
  }
  close(ready[1]);
  close(go[0]);
  char byte;
  if (read(ready[0], &byte, 1) != 1) {
    int status = 0;
    waitpid(child, &status, 0);
    errno = EPERM;
    fail("creating a user namespace");
  }
  write_maps(child, line);
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/ns/user", (int)child);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path);
  close(go[1]);
  waitpid(child, NULL, 0);
  close(ready[0]);
  return fd;
}

/* Binds `source` at `target` with the id mapping of user namespace `userns_fd`. */
/* `extra`: more MOUNT_ATTR_* flags for the new mount (volumes: nosuid, nodev). */
static void idmapped_bind(const char *source, const char *target, int userns_fd, uint64_t extra) {
  int tree = (int)syscall(SYS_open_tree, AT_FDCWD, source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
  if (tree < 0) fail(source);
  struct mount_attr attr = {0};
  attr.attr_set = MOUNT_ATTR_IDMAP | extra;
  attr.userns_fd = (uint64_t)userns_fd;
  if (syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH, &attr, sizeof attr) != 0) fail("idmapping a mount");
  if (syscall(SYS_move_mount, tree, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH) != 0) fail(target);
  close(tree);
}

static int open_dir(const char *path) {
  int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail(path);
  return fd;
}

/* Splits "/a/b/name" into an fd on "/a/b" and "name". */
static int open_parent(const char *path, char *name, size_t size) {
  const char *slash = strrchr(path, '/');
  if (!slash || !slash[1] || strlen(slash + 1) >= size) {
    errno = EINVAL;
    fail(path);
  }
  strcpy(name, slash + 1);
  char parent[4096];
  size_t length = (size_t)(slash - path);
  if (length == 0) length = 1;
  if (length >= sizeof parent) {
    errno = ENAMETOOLONG;
    fail(path);
  }
  memcpy(parent, path, length);
  parent[length] = 0;
  return open_dir(parent);
}

static unsigned long long subvolume_id(const char *path) {
  int fd = open_dir(path);
  struct btrfs_ioctl_ino_lookup_args args;
  memset(&args, 0, sizeof args);
  args.objectid = BTRFS_FIRST_FREE_OBJECTID;
  if (ioctl(fd, BTRFS_IOC_INO_LOOKUP, &args) != 0) fail("looking up a subvolume id");
  close(fd);
  return args.treeid;
}

/* A new subvolume, or a snapshot of `from`, at `path`. */
static void make_subvolume(const char *path, const char *from) {
  char name[BTRFS_SUBVOL_NAME_MAX + 1];
  int parent = open_parent(path, name, sizeof name);
  struct btrfs_ioctl_vol_args_v2 args;
  memset(&args, 0, sizeof args);
  strcpy(args.name, name);
  if (from) {
    int source = open_dir(from);
    args.fd = source;
    if (ioctl(parent, BTRFS_IOC_SNAP_CREATE_V2, &args) != 0) fail("snapshotting a layer");
    close(source);
  } else if (ioctl(parent, BTRFS_IOC_SUBVOL_CREATE_V2, &args) != 0) {
    fail("creating a layer subvolume");
  }
  close(parent);
}

static void limit_subvolume(const char *path, unsigned long long bytes) {
  int fd = open_dir(path);
  struct btrfs_ioctl_qgroup_limit_args args;
  memset(&args, 0, sizeof args);
  args.lim.flags = BTRFS_QGROUP_LIMIT_MAX_RFER;
  args.lim.max_rfer = bytes;
  if (ioctl(fd, BTRFS_IOC_QGROUP_LIMIT, &args) != 0) fail("setting the layer's quota");
  close(fd);
}

/* Removes a tree below dirfd/name without following symlinks (a layer's leftovers). */
static void remove_tree_at(int dirfd, const char *name) {
  struct stat st;
  if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
    if (errno == ENOENT) return;
    fail(name);
  }
  if (S_ISDIR(st.st_mode)) {
    int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) fail(name);
    DIR *dir = fdopendir(fd);
    if (!dir) fail(name);
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
      if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
      remove_tree_at(fd, entry->d_name);
    }
    closedir(dir);
    if (unlinkat(dirfd, name, AT_REMOVEDIR) != 0) fail(name);
  } else if (unlinkat(dirfd, name, 0) != 0) {
    fail(name);
  }
}

static void make_dir(const char *path, mode_t mode, uid_t uid, gid_t gid) {
  if (mkdir(path, mode) != 0 && errno != EEXIST) fail(path);
  if (chown(path, uid, gid) != 0 || chmod(path, mode) != 0) fail(path);
}

static void join_path(char *out, size_t size, const char *a, const char *b) {
  if ((size_t)snprintf(out, size, "%s/%s", a, b) >= size) {
    errno = ENAMETOOLONG;
    fail(a);
  }
}

static void put_varint(unsigned char **at, unsigned long long value) {
  do {
    unsigned char byte = value & 0x7f;
    value >>= 7;
    *(*at)++ = byte | (value ? 0x80 : 0);
  } while (value);
}

/*
 * CRIU's userns-<id>.img: two magic words, then one entry (length, protobuf UsernsEntry with
 * repeated uid_map = 1 and gid_map = 2, each UidGidExtent {first = 1, lower_first = 2,
 * count = 3}). Written with one extent: 0 → base, ID_COUNT ids.
 */
static void write_userns_image(int dirfd, const char *name, const unsigned char magic[8], unsigned long long base) {
  unsigned char extent[40], *at = extent;
  *at++ = 0x08;
  put_varint(&at, 0);
  *at++ = 0x10;
  put_varint(&at, base);
  *at++ = 0x18;
  put_varint(&at, ID_COUNT);
  size_t extent_length = (size_t)(at - extent);
  if (extent_length > 33) abort();
  unsigned char entry[128];
  at = entry;
  for (int field = 0; field < 2; field++) {
    *at++ = field == 0 ? 0x0a : 0x12;
    put_varint(&at, extent_length);
    memcpy(at, extent, extent_length);
    at += extent_length;
  }
  uint32_t length = (uint32_t)(at - entry);
  int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) fail(name);
  if (write(fd, magic, 8) != 8 || write(fd, &length, 4) != 4 || write(fd, entry, length) != (ssize_t)length) fail(name);
  if (fchmod(fd, 0644) != 0) fail(name);
  close(fd);
}

/* Hard links every image file into `view`; userns-*.img are written anew for `base`. */
static void make_criu_view(const char *images, const char *view, unsigned long long base) {
  step = "criu view";
  if (mkdir(view, 0755) != 0) fail(view);
  if (chmod(view, 0755) != 0) fail(view);
  int from = open_dir(images), to = open_dir(view);
  DIR *dir = fdopendir(dup(from));
  if (!dir) fail(images);
  struct dirent *entry;
  while ((entry = readdir(dir)) != NULL) {
    if (entry->d_name[0] == '.') continue;
    if (strncmp(entry->d_name, "userns-", 7) == 0) {
      unsigned char magic[8];
      int fd = openat(from, entry->d_name, O_RDONLY | O_CLOEXEC);
      if (fd < 0 || read(fd, magic, 8) != 8) fail(entry->d_name);
      close(fd);
      write_userns_image(to, entry->d_name, magic, base);
    } else if (linkat(from, entry->d_name, to, entry->d_name, 0) != 0) {
      fail(entry->d_name);
    }
  }
  closedir(dir);
  close(from);
  close(to);
}

/*
 * VOLUME_BINDS_NOTE: each volume (a directory whose files carry canonical ids) is bound
 * idmapped, as the template and layer are, at BUNDLE/volumes/N (N = its place in the list):
 * config.json binds that path into the container, so runc makes the mount point inside the
 * root (safely, as the sandbox's root) and its checkpoints know the mount as external. The
 * bundle's teardown unmounts them with everything else below it.
 */
#define VOLUMES_MAX 64

/* Splits --volumes into its paths (in `copy`); usage() unless 1-VOLUMES_MAX absolute paths. */
static int split_volumes(const char *list, char *copy, size_t size, char **sources) {
  if (snprintf(copy, size, "%s", list) >= (int)size) usage("--volumes is too long");
  int count = 0;
  for (char *saveptr = NULL, *source = strtok_r(copy, ";", &saveptr); source; source = strtok_r(NULL, ";", &saveptr)) {
    if (source[0] != '/' || count == VOLUMES_MAX) usage("--volumes takes at most 64 absolute paths separated by ;");
    sources[count++] = source;
  }
  if (count == 0) usage("--volumes takes at most 64 absolute paths separated by ;");
  return count;
}

static void bind_volumes(const char *list, const char *bundle, int idmap_ns) {
  step = "volumes";
  char dir[4096], copy[8192], *sources[VOLUMES_MAX];
  int count = split_volumes(list, copy, sizeof copy, sources);
  join_path(dir, sizeof dir, bundle, "volumes");
  if (mkdir(dir, 0711) != 0) fail(dir);
  for (int index = 0; index < count; index++) {
    const char *source = sources[index];
    char target[4096], name[16];
    snprintf(name, sizeof name, "%d", index);
    join_path(target, sizeof target, dir, name);
    if (mkdir(target, 0700) != 0) fail(target);
    /* No device node or setuid file on a volume works through the bind, whoever made it. */
    idmapped_bind(source, target, idmap_ns, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV);
  }
}

static int cmd_prepare(int argc, char **argv) {
  unsigned long long base = number(option(argc, argv, "--base", 1), "--base");
  const char *lower = option(argc, argv, "--lower", 1);
  const char *layer = option(argc, argv, "--layer", 1);
  const char *rootfs = option(argc, argv, "--rootfs", 1);
  unsigned long long quota = number(option(argc, argv, "--quota", 1), "--quota");
  const char *from = option(argc, argv, "--from", 0);
  const char *pin = option(argc, argv, "--userns", 0);
  const char *criu_images = option(argc, argv, "--criu-images", 0);
  const char *criu_view = option(argc, argv, "--criu-view", 0);
  const char *volumes = option(argc, argv, "--volumes", 0);
  if (base < CANONICAL_BASE + ID_COUNT || base + ID_COUNT > 0xffffffffull) usage("--base is outside the sandbox id ranges");
  if (!criu_images != !criu_view) usage("--criu-images and --criu-view go together");
  if (volumes) {
    /* Checked before anything is made: bind_volumes() runs last. */
    char copy[8192], *sources[VOLUMES_MAX];
    split_volumes(volumes, copy, sizeof copy, sources);
  }

  step = "layer";
  struct stat lower_root;
  if (stat(lower, &lower_root) != 0) fail(lower);
  make_subvolume(layer, from);
  char upper[4096], work[4096];
  join_path(upper, sizeof upper, layer, "upper");
  join_path(work, sizeof work, layer, "work");
  if (from) {
    /* An image's layer: its upper is the sandbox's files; the rest of the image is not. */
    int fd = open_dir(layer);
    remove_tree_at(fd, "work");
    close(fd);
  } else {
    /* The merged root takes the upper root's owner and mode: make them the template's. */
    make_dir(upper, lower_root.st_mode & 07777, lower_root.st_uid, lower_root.st_gid);
  }
  make_dir(work, 0700, CANONICAL_BASE, CANONICAL_BASE);
  if (quota) limit_subvolume(layer, quota);
  printf("subvol %llu\n", subvolume_id(layer));

  if (criu_images) make_criu_view(criu_images, criu_view, base);

  step = "user namespace";
  char line[64];
  if (pin) {
    snprintf(line, sizeof line, "0 %llu %u\n", base, ID_COUNT);
    int sandbox_ns = make_userns((uid_t)base, line);
    int fd = open(pin, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) fail(pin);
    close(fd);
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", sandbox_ns);
    if (mount(self, pin, NULL, MS_BIND, NULL) != 0) fail("pinning the user namespace");
    close(sandbox_ns);
  }

  step = "root mount";
  snprintf(line, sizeof line, "%u %llu %u\n", CANONICAL_BASE, base, ID_COUNT);
  int idmap_ns = make_userns(0, line);
  char lower_at[4096], layer_at[4096], dir[4096];
  snprintf(dir, sizeof dir, "%s", rootfs);
  char *slash = strrchr(dir, '/');
  if (!slash) usage("--rootfs must be absolute");
  *slash = 0;
  join_path(lower_at, sizeof lower_at, dir, ".lower");
  join_path(layer_at, sizeof layer_at, dir, ".layer");
  if (mkdir(lower_at, 0700) != 0 || mkdir(layer_at, 0700) != 0) fail("mount points");
  idmapped_bind(lower, lower_at, idmap_ns, 0);
  idmapped_bind(layer, layer_at, idmap_ns, 0);
  char options[8192];
  if ((size_t)snprintf(options, sizeof options, "lowerdir=%s,upperdir=%s/upper,workdir=%s/work", lower_at, layer_at, layer_at) >= sizeof options) {
    errno = ENAMETOOLONG;
    fail("overlay options");
  }
  /*
   * overlayfs works in the upper layer with its mounter's credentials: as host root (uid 0,
   * which the idmapping cannot represent) it could not even make its work directory. Mount as
   * the sandbox's root (fsuid = base), capabilities kept.
   */
  setfsgid((gid_t)base);
  setfsuid((uid_t)base);
  raise_effective_caps();
  int mounted = mount("overlay", rootfs, "overlay", 0, options);
  int saved = errno;
  setfsuid(0);
  setfsgid(0);
  raise_effective_caps();
  errno = saved;
  /* The overlay holds its own references to both layers: the bind mounts can go. */
  umount2(lower_at, MNT_DETACH);
  umount2(layer_at, MNT_DETACH);
  rmdir(lower_at);
  rmdir(layer_at);
  if (mounted != 0) fail("overlay");
  if (volumes) bind_volumes(volumes, dir, idmap_ns);
  return 0;
}

/*
 * bind-volumes: volumes for a microVM's file-sharing daemon (MICROVM_SHARES_NOTE in
 * src/runtime/microvm/shares.ts): each SRC bound at DIR/volumes/<n> idmapped from canonical ids
 * to the guest's own (100000+n on disk shown as n), so virtiofsd, which works as the guest's uid
 * and gid, makes and sees files with the owners a container sandbox sees.
 */
static int cmd_bind_volumes(int argc, char **argv) {
  const char *dir = option(argc, argv, "--dir", 1);
  const char *volumes = option(argc, argv, "--volumes", 1);
  char copy[8192], *sources[VOLUMES_MAX];
  split_volumes(volumes, copy, sizeof copy, sources);
  if (dir[0] != '/') usage("--dir must be absolute");
  step = "user namespace";
  char line[64];
  snprintf(line, sizeof line, "%u 0 %u\n", CANONICAL_BASE, ID_COUNT);
  int idmap_ns = make_userns(0, line);
  bind_volumes(volumes, dir, idmap_ns);
  close(idmap_ns);
  return 0;
}

static int cmd_snapshot(int argc, char **argv) {
  step = "snapshot";
  const char *from = option(argc, argv, "--from", 1);
  const char *to = option(argc, argv, "--to", 1);
  make_subvolume(to, from);
  printf("subvol %llu\n", subvolume_id(to));
  return 0;
}

/* Mount points at or below `dir` in this mount namespace, deepest first. */
static int mounts_below(const char *dir, char out[][4096], int max) {
  FILE *file = fopen("/proc/self/mountinfo", "re");
  if (!file) fail("mountinfo");
  char line[8192];
  int count = 0;
  size_t length = strlen(dir);
  while (fgets(line, sizeof line, file) && count < max) {
    char *field = line;
    for (int i = 0; i < 4 && field; i++) field = strchr(field, ' ') ? strchr(field, ' ') + 1 : NULL;
    if (!field) continue;
    char *end = strchr(field, ' ');
    if (!end) continue;
    *end = 0;
    /* Unescape \040 and friends. */
    char decoded[4096];
    size_t j = 0;
    for (char *c = field; *c && j + 1 < sizeof decoded; c++) {
      if (c[0] == '\\' && isdigit((unsigned char)c[1]) && isdigit((unsigned char)c[2]) && isdigit((unsigned char)c[3])) {
        decoded[j++] = (char)((c[1] - '0') * 64 + (c[2] - '0') * 8 + (c[3] - '0'));
        c += 3;
      } else {
        decoded[j++] = *c;
      }
    }
    decoded[j] = 0;
    if (strncmp(decoded, dir, length) == 0 && (decoded[length] == 0 || decoded[length] == '/')) strcpy(out[count++], decoded);
  }
  fclose(file);
  /* Deepest first: longer paths first. */
  for (int i = 0; i < count; i++)
    for (int k = i + 1; k < count; k++)
      if (strlen(out[k]) > strlen(out[i])) {
        char swap[4096];
        strcpy(swap, out[i]);
        strcpy(out[i], out[k]);
        strcpy(out[k], swap);
      }
  return count;
}

static void destroy_subvolume(const char *path) {
  struct stat st;
  if (lstat(path, &st) != 0) {
    if (errno == ENOENT) return;
    fail(path);
  }
  unsigned long long id = subvolume_id(path);
  char name[BTRFS_SUBVOL_NAME_MAX + 1];
  int parent = open_parent(path, name, sizeof name);
  struct btrfs_ioctl_vol_args args;
  memset(&args, 0, sizeof args);
  strcpy(args.name, name);
  if (ioctl(parent, BTRFS_IOC_SNAP_DESTROY, &args) != 0) fail("deleting a layer subvolume");
  /* The qgroup can only go once the cleaner dropped the tree; qgroup-gc catches the rest. */
  struct btrfs_ioctl_qgroup_create_args destroy = {.create = 0, .qgroupid = id};
  ioctl(parent, BTRFS_IOC_QGROUP_CREATE, &destroy);
  close(parent);
}

static int cmd_teardown(int argc, char **argv) {
  const char *bundle = option(argc, argv, "--bundle", 1);
  const char *layer = option(argc, argv, "--layer", 0);
  step = "unmount";
  static char found[64][4096];
  int count = mounts_below(bundle, found, 64);
  for (int i = 0; i < count; i++)
    if (umount2(found[i], 0) != 0 && umount2(found[i], MNT_DETACH) != 0 && errno != EINVAL && errno != ENOENT) fail(found[i]);
  if (layer) {
    step = "layer";
    destroy_subvolume(layer);
  }
  return 0;
}

/* sparse-copy's unit: a page of a RAM file (zero pages become holes) and the read buffer. */
#define SPARSE_PAGE 4096
#define SPARSE_CHUNK (1u << 20)

/* Writes buffer[0..length) at `at`, skipping all-zero pages (holes once the file is sized). */
static void sparse_write(int out, const char *buffer, size_t length, off_t at) {
  static const char zero[SPARSE_PAGE];
  size_t run = 0, run_length = 0;
  for (size_t page = 0; page < length; page += SPARSE_PAGE) {
    size_t size = length - page < SPARSE_PAGE ? length - page : SPARSE_PAGE;
    int empty = memcmp(buffer + page, zero, size) == 0;
    if (!empty && run_length == 0) run = page;
    if (!empty) run_length += size;
    if ((empty || page + size == length) && run_length > 0) {
      for (size_t done = 0; done < run_length;) {
        ssize_t wrote = pwrite(out, buffer + run + done, run_length - done, at + (off_t)(run + done));
        if (wrote < 0) fail("writing the copy");
        done += (size_t)wrote;
      }
      run_length = 0;
    }
  }
}

static int cmd_sparse_copy(int argc, char **argv) {
  step = "sparse-copy";
  for (int i = 2; i < argc; i += 2)
    if (strcmp(argv[i], "--from") != 0 && strcmp(argv[i], "--to") != 0) usage("sparse-copy takes --from and --to");
  const char *from = option(argc, argv, "--from", 1);
  const char *to = option(argc, argv, "--to", 1);
  if (from[0] != '/' || to[0] != '/') usage("sparse-copy: --from and --to must be absolute paths");
  int in = open(from, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (in < 0) fail(from);
  struct stat st;
  if (fstat(in, &st) != 0) fail(from);
  if (!S_ISREG(st.st_mode)) {
    errno = EINVAL;
    fail("--from is not a regular file");
  }
  int out = open(to, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (out < 0) fail(to);
  static char buffer[SPARSE_CHUNK];
  /* Only the extents the file system holds are read: a RAM file's untouched pages are holes. */
  for (off_t offset = 0; offset < st.st_size;) {
    off_t data = lseek(in, offset, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;
      fail("SEEK_DATA");
    }
    off_t hole = lseek(in, data, SEEK_HOLE);
    if (hole < 0) fail("SEEK_HOLE");
    for (off_t at = data; at < hole;) {
      size_t want = hole - at < (off_t)SPARSE_CHUNK ? (size_t)(hole - at) : SPARSE_CHUNK;
      ssize_t got = pread(in, buffer, want, at);
      if (got < 0) fail("reading the file");
      if (got == 0) break; /* it shrank meanwhile: the copy keeps the size it had */
      sparse_write(out, buffer, (size_t)got, at);
      at += got;
    }
    offset = hole;
  }
  if (ftruncate(out, st.st_size) != 0) fail("sizing the copy");
  if (close(out) != 0) fail(to);
  close(in);
  return 0;
}

static int cmd_hostname(int argc, char **argv) {
  step = "hostname";
  pid_t pid = (pid_t)number(option(argc, argv, "--pid", 1), "--pid");
  const char *hostname = option(argc, argv, "--name", 1);
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/ns/uts", (int)pid);
  int uts = open(path, O_RDONLY | O_CLOEXEC);
  if (uts < 0) fail(path);
  if (setns(uts, CLONE_NEWUTS) != 0) fail("entering the UTS namespace");
  if (sethostname(hostname, strlen(hostname)) != 0) fail("sethostname");
  return 0;
}

static int cmd_qgroup_gc(int argc, char **argv) {
  step = "qgroup gc";
  const char *mount_dir = option(argc, argv, "--mount", 1);
  int fd = open_dir(mount_dir);
  struct btrfs_ioctl_fs_info_args info;
  memset(&info, 0, sizeof info);
  if (ioctl(fd, BTRFS_IOC_FS_INFO, &info) != 0) fail("fs info");
  char dir_path[256];
  snprintf(dir_path, sizeof dir_path, "/sys/fs/btrfs/%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x/qgroups", info.fsid[0], info.fsid[1],
           info.fsid[2], info.fsid[3], info.fsid[4], info.fsid[5], info.fsid[6], info.fsid[7], info.fsid[8], info.fsid[9], info.fsid[10], info.fsid[11],
           info.fsid[12], info.fsid[13], info.fsid[14], info.fsid[15]);
  DIR *dir = opendir(dir_path);
  if (!dir) fail(dir_path);
  struct dirent *entry;
  int removed = 0;
  while ((entry = readdir(dir)) != NULL) {
    unsigned long long id;
    char tail;
    if (sscanf(entry->d_name, "0_%llu%c", &id, &tail) != 1 || id == BTRFS_FS_TREE_OBJECTID) continue;
    struct btrfs_ioctl_qgroup_create_args destroy = {.create = 0, .qgroupid = id};
    /* Refused (EBUSY) while the subvolume exists or is still being dropped. */
    if (ioctl(fd, BTRFS_IOC_QGROUP_CREATE, &destroy) == 0) removed++;
  }
  closedir(dir);
  printf("removed %d\n", removed);
  return 0;
}

#define WATCH_MAX 65536

struct watched {
  int fd;
  char tag[80];
};

/* Lines of a stream read as they come: the buffer keeps a partial last line. */
struct line_reader {
  char buffer[65536];
  size_t filled;
};

/*
 * Reads what `fd` has and calls `each` for every complete line (without its newline). A line
 * longer than the buffer is dropped. Returns 0 at the end of the stream or on an error.
 */
static int read_lines(int fd, struct line_reader *reader, void (*each)(char *line, void *context), void *context) {
  ssize_t got = read(fd, reader->buffer + reader->filled, sizeof reader->buffer - reader->filled - 1);
  if (got <= 0) return 0;
  reader->filled += (size_t)got;
  reader->buffer[reader->filled] = 0;
  char *start = reader->buffer, *newline;
  while ((newline = strchr(start, '\n')) != NULL) {
    *newline = 0;
    each(start, context);
    start = newline + 1;
  }
  reader->filled = strlen(start);
  memmove(reader->buffer, start, reader->filled);
  if (reader->filled >= sizeof reader->buffer - 1) reader->filled = 0;
  return 1;
}

struct watch_state {
  struct watched *table;
  int epoll;
};

/* One "add TAG PID" / "del TAG" line of watch. */
static void watch_line(char *start, void *context) {
  struct watch_state *state = context;
  struct watched *table = state->table;
  int epoll = state->epoll;
  char tag[80];
  int pid;
  if (sscanf(start, "add %79s %d", tag, &pid) == 2) {
    int slot = -1;
    for (int i = 0; i < WATCH_MAX; i++)
      if (table[i].fd < 0) {
        slot = i;
        break;
      }
    int fd = slot < 0 ? -1 : (int)syscall(SYS_pidfd_open, pid, 0);
    if (fd < 0) {
      /* Gone already (or no room): report it ended. */
      printf("exit %s\n", tag);
    } else {
      table[slot].fd = fd;
      strcpy(table[slot].tag, tag);
      struct epoll_event add = {.events = EPOLLIN, .data.u64 = (uint64_t)slot};
      epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &add);
    }
  } else if (sscanf(start, "del %79s", tag) == 1) {
    for (int i = 0; i < WATCH_MAX; i++)
      if (table[i].fd >= 0 && strcmp(table[i].tag, tag) == 0) {
        close(table[i].fd);
        table[i].fd = -1;
      }
  }
}

static int cmd_watch(void) {
  step = "watch";
  static struct watched table[WATCH_MAX];
  for (int i = 0; i < WATCH_MAX; i++) table[i].fd = -1;
  int epoll = epoll_create1(EPOLL_CLOEXEC);
  if (epoll < 0) fail("epoll");
  struct epoll_event event = {.events = EPOLLIN, .data.u64 = (uint64_t)-1};
  if (epoll_ctl(epoll, EPOLL_CTL_ADD, 0, &event) != 0) fail("stdin");
  setvbuf(stdout, NULL, _IOLBF, 0);
  static struct line_reader lines;
  struct watch_state watch = {.table = table, .epoll = epoll};
  for (;;) {
    struct epoll_event events[64];
    int ready = epoll_wait(epoll, events, 64, -1);
    if (ready < 0) {
      if (errno == EINTR) continue;
      fail("epoll_wait");
    }
    for (int e = 0; e < ready; e++) {
      if (events[e].data.u64 == (uint64_t)-1) {
        if (!read_lines(0, &lines, watch_line, &watch)) return 0;
      } else {
        int slot = (int)events[e].data.u64;
        if (slot < 0 || slot >= WATCH_MAX || table[slot].fd < 0) continue;
        printf("exit %s\n", table[slot].tag);
        close(table[slot].fd);
        table[slot].fd = -1;
      }
    }
  }
}

/* Uses fail(), usage(), option(), number() and `step` from above. */
#include "netlink.h"
/* Uses netlink.h's net_only_options() and net_report_ext_ack(). */
#include "nftables.h"
/* Uses netlink.h's requests and net_write_sysctl(). */
#include "conntrack.h"
/* Uses netlink.h's net_only_options(). */
#include "criu-rpc.h"

/*
 * The subcommands that take --name value pairs, for the one-shot CLI and for `serve`. A new
 * one is one line here.
 */
struct subcommand {
  const char *name;
  int (*run)(int argc, char **argv);
  /* `serve` runs it without a child (INLINE_NOTE). */
  int run_inline;
};

static const struct subcommand subcommands[] = {
    {"prepare", cmd_prepare},
    {"snapshot", cmd_snapshot},
    {"bind-volumes", cmd_bind_volumes},
    {"teardown", cmd_teardown},
    {"hostname", cmd_hostname},
    {"sparse-copy", cmd_sparse_copy},
    {"qgroup-gc", cmd_qgroup_gc},
    {"net-setup", cmd_net_setup},
    {"net-release", cmd_net_release},
    {"net-address", cmd_net_address},
    {"net-guest-tap", cmd_net_guest_tap},
    {"net-guest-release", cmd_net_guest_release},
    {"nft-batch", cmd_nft_batch, 1},
    {"criu-dump", cmd_criu_dump},
};

static const struct subcommand *find_subcommand(const char *name) {
  for (size_t i = 0; i < sizeof subcommands / sizeof subcommands[0]; i++)
    if (strcmp(subcommands[i].name, name) == 0) return &subcommands[i];
  return NULL;
}

/* argv[1] is the subcommand, then its pairs. Exits 2 (usage) on a malformed call. */
static int run_subcommand(int argc, char **argv) {
  const struct subcommand *found = find_subcommand(argv[1]);
  if (!found) usage("unknown subcommand");
  if ((argc - 2) % 2 != 0) usage("options come in --name value pairs");
  return found->run(argc, argv);
}

/*
 * serve: the resident mode (HELPER_PROTOCOL_NOTE in src/runtime/container/sandbox-helper.ts).
 * One request per line on stdin, fields separated by tabs:
 *
 *   ID TIMEOUT_MS COMMAND ARG...
 *
 * COMMAND is a subcommand of the table above (its ARGs are its --name value pairs), `exec`
 * (ARGs: [--netns PATH] [--env NAME=VALUE]... [--stdio null|capture] [--nice 0-19] -- PROGRAM
 * ARG...),
 * `cancel` (ARG: the id of a request in flight) or `ping`. Each subcommand or exec runs in a
 * child forked from this process (no exec for a subcommand), stdout and stderr in memfds;
 * requests run concurrently. When a child ends, its reply is one header line
 *
 *   ID KIND VALUE STDOUT_BYTES STDERR_BYTES
 *
 * followed by that many bytes of its stdout and then of its stderr (the first SERVE_STDOUT_MAX
 * bytes of stdout, the last SERVE_STDERR_MAX of stderr). KIND is `exit` (VALUE = status),
 * `signal` (VALUE = signal), `timeout` or `cancelled` (killed by this process; VALUE = signal)
 * or `error` (a request refused before anything ran; its message is the stderr part). Bad
 * requests get an error reply; nothing a request says ends this process. It ends when stdin
 * closes, after the children in flight ended and were answered.
 */
#define SERVE_LINE_MAX (256 * 1024)
#define SERVE_FIELDS_MAX 1024
#define SERVE_REQUESTS_MAX 512
#define SERVE_ID_MAX 32
#define SERVE_TIMEOUT_MAX_MS (24ull * 3600 * 1000)
#define SERVE_STDOUT_MAX (4u << 20)
#define SERVE_STDERR_MAX 65536u

struct request {
  pid_t pid; /* 0 = free slot */
  char id[SERVE_ID_MAX + 1];
  int output[2]; /* memfds: stdout, stderr */
  unsigned long long deadline_ms;
  const char *killed_for; /* "timeout" / "cancelled" once this process killed it */
};

static struct request requests[SERVE_REQUESTS_MAX];
static pid_t serve_pid;

static unsigned long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (unsigned long long)ts.tv_sec * 1000 + (unsigned long long)ts.tv_nsec / 1000000;
}

/* Writes everything, or gives up when the reader is gone (EPIPE: the server ended). */
static void write_all(int fd, const char *data, size_t length) {
  while (length > 0) {
    ssize_t wrote = write(fd, data, length);
    if (wrote < 0) {
      if (errno == EINTR) continue;
      return;
    }
    data += wrote;
    length -= (size_t)wrote;
  }
}

static void reply(const char *id, const char *kind, int value, const char *out, size_t out_length, const char *err, size_t err_length) {
  char header[128];
  int length = snprintf(header, sizeof header, "%s\t%s\t%d\t%zu\t%zu\n", id, kind, value, out_length, err_length);
  write_all(1, header, (size_t)length);
  write_all(1, out, out_length);
  write_all(1, err, err_length);
}

static void reply_error(const char *id, const char *message) {
  reply(id, "error", 0, "", 0, message, strlen(message));
}

static int valid_id(const char *id) {
  size_t length = strlen(id);
  if (length == 0 || length > SERVE_ID_MAX) return 0;
  for (const char *c = id; *c; c++)
    if (!isalnum((unsigned char)*c) && *c != '_' && *c != '-' && *c != '.') return 0;
  return 1;
}

static struct request *find_request(const char *id) {
  for (int i = 0; i < SERVE_REQUESTS_MAX; i++)
    if (requests[i].pid > 0 && strcmp(requests[i].id, id) == 0) return &requests[i];
  return NULL;
}

/* Reads up to `max` bytes of a memfd: its start, or its end when `tail`. Returns a malloc'd buffer. */
static char *read_capture(int fd, size_t max, int tail, size_t *length) {
  struct stat st;
  *length = 0;
  if (fstat(fd, &st) != 0 || st.st_size <= 0) return NULL;
  size_t size = (size_t)st.st_size, want = size < max ? size : max;
  off_t from = tail ? (off_t)(size - want) : 0;
  char *buffer = malloc(want);
  if (!buffer) return NULL;
  while (*length < want) {
    ssize_t got = pread(fd, buffer + *length, want - *length, from + (off_t)*length);
    if (got <= 0) break;
    *length += (size_t)got;
  }
  return buffer;
}

static void finish_request(struct request *request, int status) {
  size_t out_length, err_length;
  char *out = read_capture(request->output[0], SERVE_STDOUT_MAX, 0, &out_length);
  char *err = read_capture(request->output[1], SERVE_STDERR_MAX, 1, &err_length);
  const char *kind = request->killed_for ? request->killed_for : WIFEXITED(status) ? "exit" : "signal";
  int value = WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? WTERMSIG(status) : 0;
  reply(request->id, kind, value, out ? out : "", out_length, err ? err : "", err_length);
  free(out);
  free(err);
  close(request->output[0]);
  close(request->output[1]);
  request->pid = 0;
}

/* What an exec request asks for, parsed in the parent (so a bad one is refused, not run). */
struct exec_request {
  const char *netns;
  char **env;
  int env_count;
  int capture;
  int nice; /* 0 = the helper's own priority */
  char **argv;
};

static const char *parse_exec(char **args, int count, struct exec_request *exec) {
  memset(exec, 0, sizeof *exec);
  static char *env[SERVE_FIELDS_MAX];
  exec->env = env;
  int i = 0;
  for (; i < count; i += 2) {
    if (strcmp(args[i], "--") == 0) break;
    if (i + 1 >= count) return "exec options come in --name value pairs, then --";
    const char *value = args[i + 1];
    if (strcmp(args[i], "--netns") == 0) {
      if (value[0] != '/') return "--netns must be an absolute path";
      exec->netns = value;
    } else if (strcmp(args[i], "--env") == 0) {
      const char *equals = strchr(value, '=');
      if (!equals || equals == value) return "--env takes NAME=VALUE";
      env[exec->env_count++] = args[i + 1];
    } else if (strcmp(args[i], "--stdio") == 0) {
      if (strcmp(value, "null") != 0 && strcmp(value, "capture") != 0) return "--stdio is null or capture";
      exec->capture = strcmp(value, "capture") == 0;
    } else if (strcmp(args[i], "--nice") == 0) {
      /* Only ever lower: a negative value would be a privilege no request needs. */
      char *end;
      errno = 0;
      long nice = strtol(value, &end, 10);
      if (errno != 0 || end == value || *end != 0 || nice < 0 || nice > 19) return "--nice is 0 to 19";
      exec->nice = (int)nice;
    } else {
      return "unknown exec option";
    }
  }
  if (i >= count || i + 1 >= count) return "exec needs -- and a program";
  if (args[i + 1][0] == 0) return "exec needs a program";
  exec->argv = &args[i + 1];
  return NULL;
}

/* The child of an exec request: priority, namespace, environment, stdio, then the program. */
static void run_exec(const struct exec_request *exec, int out, int err) {
  /* Where a failure is told: stderr when captured, else the stderr memfd itself. */
  int report = exec->capture ? 2 : err;
  /*
   * A background start (a warm-pool entry's runc run): the program and everything it starts
   * (runc's threads, `runc init`, so the container's first processes) inherit the nice value;
   * the runtime sets the container's processes back to 0 when the sandbox is claimed.
   */
  if (exec->nice > 0 && setpriority(PRIO_PROCESS, 0, exec->nice) != 0) {
    dprintf(report, "sandbox-helper: setpriority %d: %s\n", exec->nice, strerror(errno));
    _exit(127);
  }
  if (exec->netns) {
    int fd = open(exec->netns, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) {
      dprintf(report, "sandbox-helper: entering the network namespace %s: %s\n", exec->netns, strerror(errno));
      _exit(127);
    }
    close(fd);
  }
  for (int i = 0; i < exec->env_count; i++) {
    char *equals = strchr(exec->env[i], '=');
    *equals = 0;
    if (setenv(exec->env[i], equals + 1, 1) != 0) {
      dprintf(report, "sandbox-helper: setenv %s: %s\n", exec->env[i], strerror(errno));
      _exit(127);
    }
  }
  if (!exec->capture) {
    /*
     * Detached runc: the container inherits runc's stdio, and must not hold a host pipe or
     * file (CRIU refuses to dump one, and a pipe would never close). /dev/null for all three.
     */
    int null = open("/dev/null", O_RDWR);
    if (null < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0) _exit(127);
    if (null > 2) close(null);
  }
  execvp(exec->argv[0], exec->argv);
  dprintf(report, "sandbox-helper: %s: %s\n", exec->argv[0], strerror(errno));
  _exit(127);
}

/* A request's subcommand as the CLI would have its argv (SERVE_FIELDS_MAX + 2 slots). */
static void subcommand_argv(char **argv, const char *command, char **args, int arg_count) {
  argv[0] = "sandbox-helper";
  argv[1] = (char *)command;
  for (int i = 0; i < arg_count; i++) argv[2 + i] = args[i];
  argv[2 + arg_count] = NULL;
}

/*
 * INLINE_NOTE: a subcommand marked run_inline (nft-batch) runs in the serve process itself: a
 * fork of this process, its memfds and its reaping cost ~1.5 ms on this project's machines,
 * the nf_tables batch itself ~0.3 ms, and it sits on a claim's path. Such a subcommand keeps no
 * state but what it says (nft-batch: its netlink socket, NFT_SOCKET_NOTE), writes nothing to
 * stdout (the reply channel), changes nothing of this process (no setns, no chdir) and closes
 * whatever else it opens on every path; its stderr goes to a memfd for the
 * reply, and fail()/usage() jump back here with the exit status instead of ending the process.
 * It blocks the loop only while the kernel answers (bounded by NET_TIMEOUT_SEC); other requests
 * wait that long.
 */
static void run_inline(const char *id, const struct subcommand *subcommand, char **args, int arg_count) {
  int err = memfd_create("stderr", MFD_CLOEXEC);
  int saved_stderr = err < 0 ? -1 : fcntl(2, F_DUPFD_CLOEXEC, 3);
  if (err < 0 || saved_stderr < 0 || dup2(err, 2) < 0) {
    if (err >= 0) close(err);
    if (saved_stderr >= 0) close(saved_stderr);
    reply_error(id, "could not capture the subcommand's stderr");
    return;
  }
  char *argv[SERVE_FIELDS_MAX + 2];
  subcommand_argv(argv, subcommand->name, args, arg_count);
  jmp_buf escape;
  volatile int status = 0;
  int left = setjmp(escape);
  if (left == 0) {
    inline_escape = &escape;
    status = subcommand->run(2 + arg_count, argv);
  } else {
    status = left;
  }
  inline_escape = NULL;
  step = "start";
  fflush(stderr);
  dup2(saved_stderr, 2);
  close(saved_stderr);
  size_t err_length;
  char *message = read_capture(err, SERVE_STDERR_MAX, 1, &err_length);
  close(err);
  reply(id, "exit", status, "", 0, message ? message : "", err_length);
  free(message);
}

/* One request line (tabs already split into fields). */
static void handle_request(char **fields, int count) {
  const char *id = fields[0];
  if (!valid_id(id)) {
    reply_error("-", "a request starts with an id of 1-32 letters, digits, '_', '-' or '.'");
    return;
  }
  if (count < 3) {
    reply_error(id, "a request is ID TIMEOUT_MS COMMAND ARG...");
    return;
  }
  const char *timeout_text = fields[1], *command = fields[2];
  char *end;
  errno = 0;
  unsigned long long timeout_ms = strtoull(timeout_text, &end, 10);
  if (errno || *end || !isdigit((unsigned char)*timeout_text) || timeout_ms == 0 || timeout_ms > SERVE_TIMEOUT_MAX_MS) {
    reply_error(id, "the timeout is a number of milliseconds, 1 to a day");
    return;
  }
  if (find_request(id)) {
    reply_error(id, "a request with this id is in flight");
    return;
  }
  char **args = &fields[3];
  int arg_count = count - 3;
  if (strcmp(command, "ping") == 0) {
    reply(id, "exit", 0, "", 0, "", 0);
    return;
  }
  if (strcmp(command, "cancel") == 0) {
    struct request *target = arg_count == 1 ? find_request(args[0]) : NULL;
    if (!target) {
      reply_error(id, "no such request in flight");
      return;
    }
    if (!target->killed_for) target->killed_for = "cancelled";
    kill(target->pid, SIGKILL);
    reply(id, "exit", 0, "", 0, "", 0);
    return;
  }
  struct exec_request exec;
  int is_exec = strcmp(command, "exec") == 0;
  if (is_exec) {
    const char *problem = parse_exec(args, arg_count, &exec);
    if (problem) {
      reply_error(id, problem);
      return;
    }
  } else if (!find_subcommand(command)) {
    reply_error(id, "unknown command");
    return;
  } else if (arg_count % 2 != 0) {
    reply_error(id, "options come in --name value pairs");
    return;
  }
  const struct subcommand *subcommand = is_exec ? NULL : find_subcommand(command);
  if (subcommand && subcommand->run_inline) {
    run_inline(id, subcommand, args, arg_count);
    return;
  }
  struct request *request = NULL;
  for (int i = 0; i < SERVE_REQUESTS_MAX && !request; i++)
    if (requests[i].pid == 0) request = &requests[i];
  if (!request) {
    reply_error(id, "too many requests in flight");
    return;
  }
  int out = memfd_create("stdout", MFD_CLOEXEC), err = memfd_create("stderr", MFD_CLOEXEC);
  if (out < 0 || err < 0) {
    if (out >= 0) close(out);
    if (err >= 0) close(err);
    reply_error(id, "memfd_create failed");
    return;
  }
  pid_t pid = fork();
  if (pid < 0) {
    close(out);
    close(err);
    reply_error(id, "fork failed");
    return;
  }
  if (pid == 0) {
    /* Ends with this process: a request in flight is failed by the server anyway. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != serve_pid) _exit(127);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    int null = open("/dev/null", O_RDONLY);
    if (null < 0 || dup2(null, 0) < 0) _exit(127);
    if (null > 0) close(null);
    if (is_exec && !exec.capture) run_exec(&exec, out, err);
    if (dup2(out, 1) < 0 || dup2(err, 2) < 0) _exit(127);
    if (is_exec) run_exec(&exec, out, err);
    /* A subcommand: its argv as the CLI would have it; fail() and usage() exit this child. */
    char *argv[SERVE_FIELDS_MAX + 2];
    subcommand_argv(argv, command, args, arg_count);
    exit(run_subcommand(2 + arg_count, argv));
  }
  request->pid = pid;
  snprintf(request->id, sizeof request->id, "%s", id);
  request->output[0] = out;
  request->output[1] = err;
  request->deadline_ms = now_ms() + timeout_ms;
  request->killed_for = NULL;
}

/* A complete line, split on tabs. */
static void handle_line(char *line) {
  /* NULL-terminated: exec's program arguments are its tail. */
  char *fields[SERVE_FIELDS_MAX + 1];
  int count = 0;
  char *start = line;
  for (;;) {
    if (count == SERVE_FIELDS_MAX) {
      reply_error(valid_id(fields[0]) ? fields[0] : "-", "too many fields in a request");
      return;
    }
    fields[count++] = start;
    char *tab = strchr(start, '\t');
    if (!tab) {
      fields[count] = NULL;
      break;
    }
    *tab = 0;
    start = tab + 1;
  }
  handle_request(fields, count);
}

static int cmd_serve(void) {
  step = "serve";
  serve_pid = getpid();
  signal(SIGPIPE, SIG_IGN);
  sigset_t child_signal;
  sigemptyset(&child_signal);
  sigaddset(&child_signal, SIGCHLD);
  if (sigprocmask(SIG_BLOCK, &child_signal, NULL) != 0) fail("sigprocmask");
  int children = signalfd(-1, &child_signal, SFD_CLOEXEC | SFD_NONBLOCK);
  if (children < 0) fail("signalfd");
  static char buffer[SERVE_LINE_MAX + 1];
  size_t filled = 0;
  /* A line longer than the buffer is dropped up to its newline, and refused. */
  int discarding = 0;
  char discarded_id[SERVE_ID_MAX + 1] = "-";
  int input_open = 1;
  for (;;) {
    int in_flight = 0;
    unsigned long long next_deadline = 0;
    for (int i = 0; i < SERVE_REQUESTS_MAX; i++) {
      if (requests[i].pid <= 0) continue;
      in_flight++;
      if (!requests[i].killed_for && (next_deadline == 0 || requests[i].deadline_ms < next_deadline)) next_deadline = requests[i].deadline_ms;
    }
    if (!input_open && in_flight == 0) return 0;
    int timeout = -1;
    if (next_deadline) {
      unsigned long long now = now_ms();
      timeout = next_deadline <= now ? 0 : (int)(next_deadline - now > 60000 ? 60000 : next_deadline - now);
    }
    struct pollfd polled[2] = {{.fd = children, .events = POLLIN}, {.fd = input_open ? 0 : -1, .events = POLLIN}};
    if (poll(polled, 2, timeout) < 0) {
      if (errno == EINTR) continue;
      fail("poll");
    }
    unsigned long long now = now_ms();
    for (int i = 0; i < SERVE_REQUESTS_MAX; i++) {
      if (requests[i].pid <= 0 || requests[i].killed_for || requests[i].deadline_ms > now) continue;
      requests[i].killed_for = "timeout";
      kill(requests[i].pid, SIGKILL);
    }
    if (polled[0].revents) {
      struct signalfd_siginfo info;
      while (read(children, &info, sizeof info) == sizeof info) {
      }
      int status;
      pid_t pid;
      while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < SERVE_REQUESTS_MAX; i++)
          if (requests[i].pid == pid) {
            finish_request(&requests[i], status);
            break;
          }
      }
    }
    if (polled[1].revents) {
      ssize_t got = read(0, buffer + filled, SERVE_LINE_MAX - filled);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        input_open = 0;
        continue;
      }
      filled += (size_t)got;
      char *start = buffer, *newline;
      while ((newline = memchr(start, '\n', filled - (size_t)(start - buffer))) != NULL) {
        *newline = 0;
        if (discarding) {
          reply_error(discarded_id, "request line too long");
          discarding = 0;
        } else if (memchr(start, 0, (size_t)(newline - start))) {
          char *tab = strchr(start, '\t');
          if (tab) *tab = 0;
          reply_error(valid_id(start) ? start : "-", "a request must not contain NUL bytes");
        } else {
          handle_line(start);
        }
        start = newline + 1;
      }
      filled -= (size_t)(start - buffer);
      memmove(buffer, start, filled);
      if (filled == SERVE_LINE_MAX) {
        if (!discarding) {
          buffer[filled] = 0;
          char *tab = memchr(buffer, '\t', filled);
          if (tab) *tab = 0;
          /* valid_id: at most SERVE_ID_MAX characters. */
          strcpy(discarded_id, valid_id(buffer) ? buffer : "-");
        }
        discarding = 1;
        filled = 0;
      }
    }
  }
}

int main(int argc, char **argv) {
  if (argc < 2) usage("usage: sandbox-helper prepare|snapshot|bind-volumes|teardown|hostname|qgroup-gc|net-setup|net-release|net-address|watch|flows|serve [--option value]...");
  if (strcmp(argv[1], "watch") == 0) return cmd_watch();
  if (strcmp(argv[1], "flows") == 0) return cmd_flows(argc, argv);
  if (strcmp(argv[1], "serve") == 0) return cmd_serve();
  return run_subcommand(argc, argv);
}
