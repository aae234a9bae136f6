/*
 * criu-rpc.h: a container's checkpoint through CRIU's RPC (`criu swrk`), without runc
 * (CRIU_RPC_NOTE in src/runtime/container/criu-dump.ts). Included by sandbox-helper.c after
 * netlink.h (its fail(), usage(), option(), number(), net_only_options(), `step`).
 *
 *   criu-dump --criu PATH --netns PATH --pid N --images DIR --work DIR --root DIR
 *             --freeze-cgroup DIR --config FILE --ext-mnts KEY=VAL;... --leave-running 0|1
 *             [--env NAME=VALUE]...
 *       Starts `PATH swrk FD` inside the netns with the variables set, sends it one DUMP request
 *       with the options runc 1.1 sends for `runc checkpoint --file-locks` of a Cubicle sandbox
 *       (its bind mounts, masked files and device nodes as external mounts, the netns as an
 *       empty one, the freezer cgroup, the log `dump.log` in the work directory, the CRIU
 *       config file), without notify scripts, and waits for CRIU's answer. Exit 0 when CRIU
 *       says it dumped; otherwise CRIU's errno and message on stderr and exit 1.
 */
#include <sys/wait.h>

#define CRIU_MAX_MESSAGE (64 * 1024)
#define CRIU_REQ_DUMP 1
#define CRIU_REQ_NOTIFY 6

/* A protobuf message being written (CRIU's RPC is proto2 over a SOCK_SEQPACKET pair). */
struct pb {
  unsigned char data[CRIU_MAX_MESSAGE];
  size_t length;
};

static void pb_byte(struct pb *pb, unsigned char byte) {
  if (pb->length >= sizeof pb->data) fail("the CRIU request is too large");
  pb->data[pb->length++] = byte;
}

static void pb_varint(struct pb *pb, uint64_t value) {
  do {
    unsigned char byte = value & 0x7f;
    value >>= 7;
    pb_byte(pb, value ? byte | 0x80 : byte);
  } while (value);
}

static void pb_uint(struct pb *pb, unsigned field, uint64_t value) {
  pb_varint(pb, (uint64_t)field << 3);
  pb_varint(pb, value);
}

static void pb_bytes(struct pb *pb, unsigned field, const void *data, size_t length) {
  pb_varint(pb, (uint64_t)field << 3 | 2);
  pb_varint(pb, length);
  if (pb->length + length > sizeof pb->data) fail("the CRIU request is too large");
  memcpy(pb->data + pb->length, data, length);
  pb->length += length;
}

static void pb_string(struct pb *pb, unsigned field, const char *text) { pb_bytes(pb, field, text, strlen(text)); }

/* Reads a varint at *at (bounded by end); 0 when it runs past the end. */
static int pb_read_varint(const unsigned char **at, const unsigned char *end, uint64_t *value) {
  *value = 0;
  for (unsigned shift = 0; *at < end && shift < 64; shift += 7) {
    unsigned char byte = *(*at)++;
    *value |= (uint64_t)(byte & 0x7f) << shift;
    if (!(byte & 0x80)) return 1;
  }
  return 0;
}

/* The fields of a criu_resp we act on. */
struct criu_answer {
  uint64_t type, success, cr_errno;
  char errmsg[512];
};

static int criu_parse_answer(const unsigned char *data, size_t length, struct criu_answer *answer) {
  memset(answer, 0, sizeof *answer);
  const unsigned char *at = data, *end = data + length;
  while (at < end) {
    uint64_t key, value;
    if (!pb_read_varint(&at, end, &key)) return 0;
    unsigned field = (unsigned)(key >> 3), wire = (unsigned)(key & 7);
    if (wire == 0) {
      if (!pb_read_varint(&at, end, &value)) return 0;
      if (field == 1) answer->type = value;
      else if (field == 2) answer->success = value;
      else if (field == 7) answer->cr_errno = value;
    } else if (wire == 2) {
      if (!pb_read_varint(&at, end, &value) || value > (uint64_t)(end - at)) return 0;
      if (field == 9) snprintf(answer->errmsg, sizeof answer->errmsg, "%.*s", (int)value, (const char *)at);
      at += value;
    } else if (wire == 5) {
      at += 4;
    } else if (wire == 1) {
      at += 8;
    } else {
      return 0;
    }
  }
  return at == end;
}

static int cmd_criu_dump(int argc, char **argv) {
  step = "criu-dump";
  static const char *const known[] = {"--criu", "--netns", "--pid", "--images", "--work", "--root", "--freeze-cgroup", "--config", "--ext-mnts", "--leave-running", "--env", NULL};
  net_only_options(argc, argv, known);
  const char *criu = option(argc, argv, "--criu", 1);
  const char *netns = option(argc, argv, "--netns", 1);
  unsigned long long pid = number(option(argc, argv, "--pid", 1), "--pid");
  const char *images = option(argc, argv, "--images", 1);
  const char *work = option(argc, argv, "--work", 1);
  const char *root = option(argc, argv, "--root", 1);
  const char *freezer = option(argc, argv, "--freeze-cgroup", 1);
  const char *config = option(argc, argv, "--config", 1);
  const char *mounts = option(argc, argv, "--ext-mnts", 1);
  const char *leave = option(argc, argv, "--leave-running", 1);
  if (pid < 1 || pid > 4194304) usage("--pid must be a process id");
  if (strcmp(leave, "0") != 0 && strcmp(leave, "1") != 0) usage("--leave-running must be 0 or 1");

  int images_fd = open(images, O_RDONLY | O_DIRECTORY);
  int work_fd = open(work, O_RDONLY | O_DIRECTORY);
  if (images_fd < 0 || work_fd < 0) fail("opening the image or work directory");
  int netns_fd = open(netns, O_RDONLY | O_CLOEXEC);
  if (netns_fd < 0 || setns(netns_fd, CLONE_NEWNET) != 0) fail("entering the sandbox's network namespace");
  close(netns_fd);

  /* The request, as runc 1.1 builds it for `checkpoint --file-locks` (but no notify scripts). */
  static struct pb opts, request;
  pb_uint(&opts, 1, (uint64_t)images_fd);
  pb_uint(&opts, 2, pid);
  pb_uint(&opts, 3, leave[0] == '1');
  pb_uint(&opts, 4, 0);  /* ext_unix_sk */
  pb_uint(&opts, 5, 0);  /* tcp_established */
  pb_uint(&opts, 7, 0);  /* shell_job */
  pb_uint(&opts, 8, 1);  /* file_locks */
  pb_uint(&opts, 9, 4);  /* log_level */
  pb_string(&opts, 10, "dump.log");
  pb_string(&opts, 13, root);
  pb_uint(&opts, 16, 0); /* auto_dedup */
  pb_uint(&opts, 17, (uint64_t)work_fd);
  char list[16384];
  snprintf(list, sizeof list, "%s", mounts);
  char *saved = NULL;
  for (char *entry = strtok_r(list, ";", &saved); entry; entry = strtok_r(NULL, ";", &saved)) {
    char *equals = strchr(entry, '=');
    if (!equals || equals == entry || !equals[1]) usage("--ext-mnts entries are KEY=VAL");
    *equals = 0;
    static struct pb map;
    map.length = 0;
    pb_string(&map, 1, entry);
    pb_string(&map, 2, equals + 1);
    pb_bytes(&opts, 23, map.data, map.length);
  }
  pb_uint(&opts, 24, 1);                  /* manage_cgroups */
  pb_uint(&opts, 38, CLONE_NEWNET);       /* empty_ns: the netns is the host's, joined by path */
  pb_string(&opts, 44, freezer);
  pb_uint(&opts, 48, 0);                  /* lazy_pages */
  pb_uint(&opts, 50, 1);                  /* orphan_pts_master */
  pb_string(&opts, 51, config);
  pb_uint(&request, 1, CRIU_REQ_DUMP);
  pb_bytes(&request, 2, opts.data, opts.length);

  int pair[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) fail("socketpair");
  pid_t child = fork();
  if (child < 0) fail("fork");
  if (child == 0) {
    /* CRIU's end stays open across exec; ours does not. */
    int fd = dup(pair[1]);
    if (fd < 0) _exit(127);
    for (int i = 2; i + 1 < argc; i += 2)
      if (strcmp(argv[i], "--env") == 0 && strchr(argv[i + 1], '=')) putenv(argv[i + 1]);
    char fd_text[16];
    snprintf(fd_text, sizeof fd_text, "%d", fd);
    execl(criu, criu, "swrk", fd_text, (char *)NULL);
    fprintf(stderr, "sandbox-helper: criu-dump: cannot execute %s: %s\n", criu, strerror(errno));
    _exit(127);
  }
  close(pair[1]);
  if (send(pair[0], request.data, request.length, MSG_NOSIGNAL) != (ssize_t)request.length) fail("sending the dump request to CRIU");
  static unsigned char answer_data[CRIU_MAX_MESSAGE];
  struct criu_answer answer = {0};
  int answered = 0;
  for (;;) {
    ssize_t got = recv(pair[0], answer_data, sizeof answer_data, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    if (!criu_parse_answer(answer_data, (size_t)got, &answer)) {
      fprintf(stderr, "sandbox-helper: criu-dump: CRIU's answer is not a criu_resp\n");
      break;
    }
    if (answer.type == CRIU_REQ_NOTIFY) {
      /* Not asked for (no notify scripts); acknowledged anyway so that CRIU goes on. */
      static struct pb ack;
      ack.length = 0;
      pb_uint(&ack, 1, CRIU_REQ_NOTIFY);
      pb_uint(&ack, 3, 1);
      send(pair[0], ack.data, ack.length, MSG_NOSIGNAL);
      continue;
    }
    answered = 1;
    break;
  }
  close(pair[0]);
  int status = 0;
  while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  if (!answered) {
    fprintf(stderr, "sandbox-helper: criu-dump: CRIU ended without an answer (%s %d)\n", WIFSIGNALED(status) ? "signal" : "exit", WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
    return 1;
  }
  if (answer.type != CRIU_REQ_DUMP || !answer.success) {
    fprintf(stderr, "sandbox-helper: criu-dump: CRIU did not dump (errno %llu%s%s); see dump.log\n", (unsigned long long)answer.cr_errno, answer.errmsg[0] ? ": " : "", answer.errmsg);
    return 1;
  }
  return 0;
}
