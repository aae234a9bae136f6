/*
 * Process start for the agent without a fork of Node (SPAWN_NOTE in
 * src/agent/process/spawn-addon.ts): a Node-API addon.
 *
 * Node's child_process.spawn forks the agent (libuv uses fork(): the kernel copies the page
 * tables of a ~60 MB process, ~7-9 ms here) and then execs run-as, which execs the command. This
 * addon starts the command the way glibc's posix_spawn does: clone(CLONE_VM | CLONE_VFORK) on a
 * stack of its own, so nothing of Node's address space is copied; the parent thread sleeps until
 * the child has called execve (or died), and the child does run-as's work itself on the way:
 * new session (like `detached: true`), stdio, every other descriptor closed, signal dispositions
 * and mask reset, oom_score_adj 1000 (OOM_NOTE), cwd, supplementary groups, gid, uid, exec with
 * execvp's PATH semantics (the candidates are built in JS from the child's own PATH).
 *
 * The child shares the agent's memory and its thread's TLS, so it does only async-signal-safe
 * raw system calls on data prepared by the parent, and reports a failure by writing into that
 * shared memory (the parent reads it once clone returns, as glibc's posix_spawn does). Credentials
 * go through syscall(SYS_set*): glibc's setgroups/setresuid wrappers would broadcast the change
 * to every thread of the agent (SIGSETXID), i.e. switch Node itself to the user. Every signal is
 * blocked in the parent around clone, so no handler of Node can run on the child's stack before
 * the child has reset them all to SIG_DFL.
 *
 * Exit: a pidfd per child, watched by a uv_poll_t on Node's own loop; when it turns readable the
 * child is reaped with waitid (libuv reaps only the pids it spawned itself, so these are ours
 * alone) and onExit(exitCode, signal) is called exactly once.
 *
 *   probe()                         -> true, or throws (ENOSYS: no pidfd_open / clone here)
 *   spawn(candidates, argv, envp, cwd, ids, stdin, onExit)
 *       candidates  string[]: the paths to try, in order (execvp: the PATH entries + file)
 *       argv, envp  string[]: the command's argv and its "NAME=value" environment
 *       cwd         string
 *       ids         [uid, gid, groups[]] to switch to, or null to keep the agent's
 *       stdin       boolean: a socket for stdin (true) or /dev/null (false)
 *       onExit      (exitCode, signal) => void; exactly one is non-zero/meaningful: signal > 0
 *                   when killed by a signal
 *     -> [pid, stdinFd or -1, stdoutFd, stderrFd]: the agent's ends of AF_UNIX stream socket
 *        pairs (libuv gives children socketpairs too), close-on-exec, owned by the caller.
 *     throws Error with `code` (errno name) and `syscall` ("chdir", "execve", "setgroups", ...)
 *     when the child could not be started; the child is then already reaped.
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>
#include <uv.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#if !defined(__x86_64__) && !defined(__aarch64__)
/* struct kernel_sigaction below has the layout of these two; scripts/build.mjs then falls back. */
#error "spawn.node is written for x86_64 and aarch64"
#endif

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif

#define CHILD_STACK_BYTES (64 * 1024)
#define MAX_GROUPS 65536
#define OOM_SCORE_ADJ "1000"

/* The kernel's struct sigaction for rt_sigaction (x86_64 and aarch64 both have sa_restorer). */
struct kernel_sigaction {
  void (*handler)(int);
  unsigned long flags;
  void (*restorer)(void);
  uint64_t mask;
};

enum stage { STAGE_NONE = 0, STAGE_SETSID, STAGE_DUP2, STAGE_CHDIR, STAGE_SETGROUPS, STAGE_SETGID, STAGE_SETUID, STAGE_EXECVE };
static const char *stage_names[] = {"spawn", "setsid", "dup2", "chdir", "setgroups", "setresgid", "setresuid", "execve"};

/* Everything the child needs, prepared by the parent; the child writes back error/stage only. */
struct child_args {
  char **candidates;
  size_t candidate_count;
  char **argv;
  char **script_argv;     /* "/bin/sh", <candidate>, argv[1..]: execvp's ENOEXEC fallback */
  char **envp;
  const char *cwd;
  int switch_ids;
  uid_t uid;
  gid_t gid;
  gid_t *groups;
  size_t group_count;
  int stdio[3];           /* the child's ends, all >= 3 */
  int max_fd;             /* for the close loop when close_range is missing */
  volatile int error;     /* errno of the failed step, 0 when execve succeeded */
  volatile int stage;
};

/*
 * A system call's result as -errno on failure. syscall() stores errno in the TLS of the parent's
 * thread (the child runs with it); that thread sleeps until the child is gone, so this is safe.
 */
static long raw(long result) {
  return result == -1 ? -errno : result;
}

static void mark_for_oom_killer(void) {
  int fd = (int)syscall(SYS_openat, AT_FDCWD, "/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return; /* no /proc: the command runs unmarked, as with run-as */
  if (syscall(SYS_write, fd, OOM_SCORE_ADJ, sizeof OOM_SCORE_ADJ - 1) < 0) {
    /* best effort */
  }
  syscall(SYS_close, fd);
}

static void close_other_fds(int max_fd) {
  if (syscall(SYS_close_range, 3U, ~0U, 0U) == 0) return;
  for (int fd = 3; fd < max_fd; fd++) syscall(SYS_close, fd);
}

static int child_fail(struct child_args *args, enum stage stage, long error) {
  args->error = (int)-error;
  args->stage = stage;
  /* run-as's codes; nobody sees them (the parent reaps and throws) but ps and strace. */
  syscall(SYS_exit, stage == STAGE_EXECVE ? (error == -ENOENT ? 127 : 126) : 125);
  return 0;
}

/* Runs in the child, on its own stack, in the agent's memory (see the header). */
static int child_main(void *opaque) {
  struct child_args *args = opaque;
  long result;

  /* Every signal is blocked (the parent did it): reset dispositions before unblocking. */
  struct kernel_sigaction dfl = {.handler = SIG_DFL};
  for (int sig = 1; sig < 65; sig++) {
    if (sig == SIGKILL || sig == SIGSTOP) continue;
    syscall(SYS_rt_sigaction, sig, &dfl, NULL, sizeof dfl.mask);
  }

  if ((result = raw(syscall(SYS_setsid))) < 0) return child_fail(args, STAGE_SETSID, result);
  for (int target = 0; target < 3; target++) {
    if ((result = raw(syscall(SYS_dup3, args->stdio[target], target, 0))) < 0) return child_fail(args, STAGE_DUP2, result);
  }
  close_other_fds(args->max_fd);
  mark_for_oom_killer();
  /*
   * The agent may run with address randomisation off (sandbox-boot --merge-memory); the
   * personality is the task's, not the shared memory's, so the command gets it back here.
   * Merging (PR_SET_MEMORY_MERGE) belongs to the memory the child shares with the agent: it
   * cannot be switched off here without unmerging the agent, so the command inherits it.
   */
  long persona = raw(syscall(SYS_personality, 0xffffffffUL));
  if (persona >= 0 && (persona & ADDR_NO_RANDOMIZE)) syscall(SYS_personality, (unsigned long)persona & ~(unsigned long)ADDR_NO_RANDOMIZE);
  /* As root, like today's spawn (Node chdirs before run-as drops the user). */
  if ((result = raw(syscall(SYS_chdir, args->cwd))) < 0) return child_fail(args, STAGE_CHDIR, result);
  if (args->switch_ids) {
    if ((result = raw(syscall(SYS_setgroups, args->group_count, args->groups))) < 0) return child_fail(args, STAGE_SETGROUPS, result);
    if ((result = raw(syscall(SYS_setresgid, args->gid, args->gid, args->gid))) < 0) return child_fail(args, STAGE_SETGID, result);
    if ((result = raw(syscall(SYS_setresuid, args->uid, args->uid, args->uid))) < 0) return child_fail(args, STAGE_SETUID, result);
  }
  uint64_t none = 0;
  syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, sizeof none);

  /* execvp (glibc posix/execvpe.c): EACCES anywhere wins over ENOENT; other errors stop. */
  int saw_eacces = 0;
  result = -ENOENT;
  for (size_t i = 0; i < args->candidate_count; i++) {
    result = raw(syscall(SYS_execve, args->candidates[i], args->argv, args->envp));
    if (result == -ENOEXEC) {
      args->script_argv[1] = args->candidates[i];
      result = raw(syscall(SYS_execve, args->script_argv[0], args->script_argv, args->envp));
    }
    if (result == -EACCES) saw_eacces = 1;
    else if (result != -ENOENT && result != -ESTALE && result != -ENOTDIR && result != -ENODEV && result != -ETIMEDOUT) break;
  }
  if (saw_eacces && (result == -ENOENT || result == -ESTALE || result == -ENOTDIR || result == -ENODEV || result == -ETIMEDOUT)) result = -EACCES;
  return child_fail(args, STAGE_EXECVE, result);
}

/* --- exit watch --------------------------------------------------------------------------- */

struct exit_watch {
  uv_poll_t poll;
  napi_env env;
  napi_ref on_exit;
  napi_async_context async_context;
  pid_t pid;
  int pidfd;
};

static void free_watch(uv_handle_t *handle) {
  struct exit_watch *watch = handle->data;
  close(watch->pidfd);
  free(watch);
}

static void call_on_exit(struct exit_watch *watch, int code, int signal) {
  napi_env env = watch->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value callback, global, argv[2], result;
  napi_get_reference_value(env, watch->on_exit, &callback);
  napi_get_global(env, &global);
  napi_create_int32(env, code, &argv[0]);
  napi_create_int32(env, signal, &argv[1]);
  /* make_callback, not call_function: it runs the microtasks the callback queued. */
  napi_make_callback(env, watch->async_context, global, callback, 2, argv, &result);
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (pending) {
    napi_value error;
    napi_get_and_clear_last_exception(env, &error);
    napi_fatal_exception(env, error);
  }
  napi_close_handle_scope(env, scope);
  napi_delete_reference(env, watch->on_exit);
  napi_async_destroy(env, watch->async_context);
}

static void on_pidfd_readable(uv_poll_t *poll, int status, int events) {
  struct exit_watch *watch = poll->data;
  siginfo_t info;
  memset(&info, 0, sizeof info);
  int code, signal = 0;
  /* The pidfd is readable once the process has exited; WNOHANG guards a spurious wakeup. */
  if (waitid(P_PID, (id_t)watch->pid, &info, WEXITED | WNOHANG) != 0) {
    if (errno == EINTR) return;
    code = -1; /* ECHILD: someone else reaped it (never expected); still end it once */
  } else if (info.si_pid == 0) {
    if (status < 0) uv_poll_start(poll, UV_READABLE, on_pidfd_readable);
    return;
  } else if (info.si_code == CLD_EXITED) {
    code = info.si_status;
  } else {
    code = -1;
    signal = info.si_status;
  }
  uv_poll_stop(poll);
  uv_close((uv_handle_t *)poll, free_watch);
  call_on_exit(watch, code, signal);
}

/* --- argument marshalling ----------------------------------------------------------------- */

static napi_value throw_error(napi_env env, int error, const char *syscall_name) {
  const char *name = strerrorname_np(error);
  char message[160];
  snprintf(message, sizeof message, "%s: %s", syscall_name, strerror(error));
  napi_value code, text, exception, call, number;
  napi_create_string_utf8(env, name ? name : "EIO", NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &text);
  napi_create_string_utf8(env, syscall_name, NAPI_AUTO_LENGTH, &call);
  napi_create_int32(env, -error, &number);
  napi_create_error(env, code, text, &exception);
  napi_set_named_property(env, exception, "code", code);
  napi_set_named_property(env, exception, "errno", number);
  napi_set_named_property(env, exception, "syscall", call);
  napi_throw(env, exception);
  return NULL;
}

static napi_value throw_type(napi_env env, const char *message) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
  return NULL;
}

/* A NULL-terminated copy of a JS string array, `extra` NULL slots reserved in front; NULL on error (exception pending). */
static char **read_strings(napi_env env, napi_value array, size_t extra, size_t *count_out, const char *what) {
  bool is_array = false;
  napi_is_array(env, array, &is_array);
  if (!is_array) {
    throw_type(env, what);
    return NULL;
  }
  uint32_t count;
  napi_get_array_length(env, array, &count);
  /* One allocation: the pointer table, then the strings. */
  size_t bytes = 0;
  for (uint32_t i = 0; i < count; i++) {
    napi_value item;
    size_t length;
    napi_get_element(env, array, i, &item);
    if (napi_get_value_string_utf8(env, item, NULL, 0, &length) != napi_ok) {
      throw_type(env, what);
      return NULL;
    }
    bytes += length + 1;
  }
  size_t table = (extra + count + 1) * sizeof(char *);
  char **list = calloc(1, table + bytes);
  if (!list) {
    throw_error(env, ENOMEM, "spawn");
    return NULL;
  }
  char *next = (char *)list + table;
  for (uint32_t i = 0; i < count; i++) {
    napi_value item;
    size_t length;
    napi_get_element(env, array, i, &item);
    napi_get_value_string_utf8(env, item, next, (size_t)((char *)list + table + bytes - next), &length);
    if (strlen(next) != length) {
      free(list);
      throw_error(env, EINVAL, "spawn: a NUL byte in a string");
      return NULL;
    }
    list[extra + i] = next;
    next += length + 1;
  }
  if (count_out) *count_out = count;
  return list;
}

static int read_ids(napi_env env, napi_value value, struct child_args *args) {
  napi_valuetype type;
  napi_typeof(env, value, &type);
  if (type == napi_null || type == napi_undefined) return 1;
  bool is_array = false;
  napi_is_array(env, value, &is_array);
  napi_value uid, gid, groups;
  uint32_t count = 0;
  if (!is_array || napi_get_element(env, value, 0, &uid) != napi_ok || napi_get_element(env, value, 1, &gid) != napi_ok ||
      napi_get_element(env, value, 2, &groups) != napi_ok || napi_get_array_length(env, groups, &count) != napi_ok || count > MAX_GROUPS) {
    throw_type(env, "ids must be [uid, gid, groups[]] or null");
    return 0;
  }
  uint32_t id;
  if (napi_get_value_uint32(env, uid, &id) != napi_ok) return throw_type(env, "uid must be a number"), 0;
  args->uid = id;
  if (napi_get_value_uint32(env, gid, &id) != napi_ok) return throw_type(env, "gid must be a number"), 0;
  args->gid = id;
  args->groups = calloc(count + 1, sizeof(gid_t));
  if (!args->groups) return throw_error(env, ENOMEM, "spawn"), 0;
  for (uint32_t i = 0; i < count; i++) {
    napi_value item;
    napi_get_element(env, groups, i, &item);
    if (napi_get_value_uint32(env, item, &id) != napi_ok) return throw_type(env, "groups must be numbers"), 0;
    args->groups[i] = id;
  }
  args->group_count = count;
  args->switch_ids = 1;
  return 1;
}

/* Moves fd to >= 3 (close-on-exec) so the child's dup2 onto 0..2 cannot clobber another end. */
static int above_stdio(int fd) {
  if (fd >= 3) return fd;
  int moved = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  int error = errno;
  close(fd);
  errno = error;
  return moved;
}

static void close_all(int *fds, size_t count) {
  for (size_t i = 0; i < count; i++) if (fds[i] >= 0) close(fds[i]);
}

/* --- spawn -------------------------------------------------------------------------------- */

static napi_value spawn(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value argv[7];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  napi_valuetype callback_type = napi_undefined;
  if (argc == 7) napi_typeof(env, argv[6], &callback_type);
  if (callback_type != napi_function) return throw_type(env, "spawn(candidates, argv, envp, cwd, ids, stdin, onExit)");

  struct child_args args;
  memset(&args, 0, sizeof args);
  napi_value result = NULL;
  char **script_argv = NULL;
  char *cwd = NULL;
  /* parent ends [stdin, stdout, stderr], then child ends */
  int fds[6] = {-1, -1, -1, -1, -1, -1};
  void *stack = MAP_FAILED;
  sigset_t all, saved;

  args.candidates = read_strings(env, argv[0], 0, &args.candidate_count, "candidates must be an array of strings");
  if (!args.candidates) goto out;
  size_t arg_count;
  args.argv = read_strings(env, argv[1], 0, &arg_count, "argv must be an array of strings");
  if (!args.argv) goto out;
  if (arg_count == 0 || args.candidate_count == 0) {
    throw_type(env, "argv and candidates must not be empty");
    goto out;
  }
  /* Shares argv[1..]'s strings: slots 0 and 1 are "/bin/sh" and the script. */
  script_argv = calloc(arg_count + 2, sizeof(char *));
  if (!script_argv) {
    throw_error(env, ENOMEM, "spawn");
    goto out;
  }
  script_argv[0] = "/bin/sh";
  for (size_t i = 1; i < arg_count; i++) script_argv[i + 1] = args.argv[i];
  args.script_argv = script_argv;
  args.envp = read_strings(env, argv[2], 0, NULL, "envp must be an array of strings");
  if (!args.envp) goto out;
  size_t cwd_length;
  if (napi_get_value_string_utf8(env, argv[3], NULL, 0, &cwd_length) != napi_ok) {
    throw_type(env, "cwd must be a string");
    goto out;
  }
  cwd = malloc(cwd_length + 1);
  if (!cwd) {
    throw_error(env, ENOMEM, "spawn");
    goto out;
  }
  napi_get_value_string_utf8(env, argv[3], cwd, cwd_length + 1, &cwd_length);
  if (strlen(cwd) != cwd_length) {
    throw_error(env, EINVAL, "spawn: a NUL byte in cwd");
    goto out;
  }
  args.cwd = cwd;
  if (!read_ids(env, argv[4], &args)) goto out;
  bool want_stdin = false;
  napi_get_value_bool(env, argv[5], &want_stdin);

  struct rlimit limit;
  args.max_fd = getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < 65536 ? (int)limit.rlim_cur : 65536;

  int pair[2];
  if (want_stdin) {
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
      throw_error(env, errno, "socketpair");
      goto out;
    }
    fds[0] = pair[0];
    fds[3] = pair[1];
  } else {
    fds[3] = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fds[3] < 0) {
      throw_error(env, errno, "open /dev/null");
      goto out;
    }
  }
  for (int i = 1; i < 3; i++) {
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
      throw_error(env, errno, "socketpair");
      goto out;
    }
    fds[i] = pair[0];
    fds[3 + i] = pair[1];
  }
  for (int i = 0; i < 6; i++) {
    if (fds[i] >= 0 && (fds[i] = above_stdio(fds[i])) < 0) {
      throw_error(env, errno, "fcntl");
      goto out;
    }
  }
  for (int i = 0; i < 3; i++) args.stdio[i] = fds[3 + i];

  stack = mmap(NULL, CHILD_STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
  if (stack == MAP_FAILED) {
    throw_error(env, errno, "mmap");
    goto out;
  }

  /* Raw, so glibc's internal signals (SIGCANCEL, SIGSETXID) are blocked too, as in posix_spawn. */
  sigfillset(&all);
  syscall(SYS_rt_sigprocmask, SIG_BLOCK, &all, &saved, 8);
  pid_t pid = clone(child_main, (char *)stack + CHILD_STACK_BYTES, CLONE_VM | CLONE_VFORK | SIGCHLD, &args);
  int clone_error = errno;
  syscall(SYS_rt_sigprocmask, SIG_SETMASK, &saved, NULL, 8);
  close_all(fds + 3, 3);
  fds[3] = fds[4] = fds[5] = -1;

  if (pid < 0) {
    throw_error(env, clone_error, "clone");
    goto out;
  }
  if (args.error != 0) {
    /* It has exited already (CLONE_VFORK): reap it, then report why. */
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
    throw_error(env, args.error, stage_names[args.stage]);
    goto out;
  }

  struct exit_watch *watch = calloc(1, sizeof *watch);
  int pidfd = watch ? (int)syscall(SYS_pidfd_open, pid, 0) : -1;
  int watch_error = watch ? errno : ENOMEM;
  uv_loop_t *loop = NULL;
  if (pidfd >= 0) napi_get_uv_event_loop(env, &loop);
  if (pidfd < 0 || !loop || uv_poll_init(loop, &watch->poll, pidfd) != 0) {
    /* The command runs but could not be watched: stop it rather than leave it unreaped. */
    kill(pid, SIGKILL);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
    if (pidfd >= 0) close(pidfd);
    free(watch);
    throw_error(env, pidfd < 0 ? watch_error : EIO, pidfd < 0 ? "pidfd_open" : "uv_poll_init");
    goto out;
  }
  watch->poll.data = watch;
  watch->env = env;
  watch->pid = pid;
  watch->pidfd = pidfd;
  napi_value resource_name;
  napi_create_string_utf8(env, "CubicleSpawn", NAPI_AUTO_LENGTH, &resource_name);
  napi_async_init(env, NULL, resource_name, &watch->async_context);
  napi_create_reference(env, argv[6], 1, &watch->on_exit);
  uv_poll_start(&watch->poll, UV_READABLE, on_pidfd_readable);

  napi_value values[4];
  napi_create_array_with_length(env, 4, &result);
  napi_create_int32(env, pid, &values[0]);
  for (int i = 0; i < 3; i++) napi_create_int32(env, fds[i], &values[i + 1]);
  for (uint32_t i = 0; i < 4; i++) napi_set_element(env, result, i, values[i]);
  fds[0] = fds[1] = fds[2] = -1; /* now the caller's */

out:
  close_all(fds, 6);
  if (stack != MAP_FAILED) munmap(stack, CHILD_STACK_BYTES);
  free(args.candidates);
  free(args.argv);
  free(script_argv);
  free(args.envp);
  free(args.groups);
  free(cwd);
  return result;
}

/* Fails with ENOSYS (or EPERM under a seccomp filter) where the exit watch cannot work. */
static napi_value probe(napi_env env, napi_callback_info info) {
  int fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
  if (fd < 0) return throw_error(env, errno, "pidfd_open");
  close(fd);
  napi_value yes;
  napi_get_boolean(env, true, &yes);
  return yes;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor properties[] = {
      {"spawn", NULL, spawn, NULL, NULL, NULL, napi_default, NULL},
      {"probe", NULL, probe, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof properties / sizeof properties[0], properties);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
