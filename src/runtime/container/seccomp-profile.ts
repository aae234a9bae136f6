/**
 * The seccomp filter of every container sandbox: allow by default, refuse (EPERM) the system
 * calls that reach kernel-global state or are a frequent source of kernel exploits. A sandbox is
 * a general-purpose Linux machine (compilers, debuggers, nested containers), so an allow-list
 * like Docker's would break too much; the user namespace and the dropped capabilities do the
 * rest (most of these fail anyway without host capabilities — the filter removes the attack
 * surface behind the permission check).
 *
 * Decisions:
 * - ptrace, process_vm_readv/writev stay allowed: debuggers (gdb, strace, py-spy) are ordinary
 *   sandbox tools, the PID namespace keeps them to the sandbox's own processes, and kernels
 *   since 4.8 re-check seccomp after a ptrace-induced syscall change.
 * - mount, umount2, pivot_root, unshare and clone with new namespaces stay allowed: they only
 *   work inside a user namespace the sandbox itself owns (nested containers, `unshare -r`).
 * - io_uring is refused, as in Docker since 25.0: its kernel code has had many privilege
 *   escalations, and programs fall back to epoll.
 * - keyctl/add_key/request_key are refused: the kernel keyring is not namespaced.
 * - bpf, perf_event_open, userfaultfd: refused (unprivileged use is the exploit surface).
 */
export const DENIED_SYSCALLS: readonly string[] = [
  // kernel and module loading, reboot, swap, accounting
  "kexec_load",
  "kexec_file_load",
  "init_module",
  "finit_module",
  "delete_module",
  "create_module",
  "get_kernel_syms",
  "query_module",
  "reboot",
  "swapon",
  "swapoff",
  "acct",
  // keyrings are global
  "keyctl",
  "add_key",
  "request_key",
  // exploit surface
  "bpf",
  "perf_event_open",
  "userfaultfd",
  "io_uring_setup",
  "io_uring_enter",
  "io_uring_register",
  "open_by_handle_at",
  "name_to_handle_at",
  "lookup_dcookie",
  "fanotify_init",
  // clocks and the kernel log are host-wide
  "settimeofday",
  "clock_settime",
  "clock_settime64",
  "clock_adjtime",
  "clock_adjtime64",
  "adjtimex",
  "stime",
  "syslog",
  // raw hardware and obsolete interfaces
  "iopl",
  "ioperm",
  "quotactl",
  "quotactl_fd",
  "nfsservctl",
  "uselib",
  "_sysctl",
  "ustat",
  "sysfs",
  "vm86",
  "vm86old",
];

const ARCHITECTURES: Record<string, string[]> = {
  x64: ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
  arm64: ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
};

/** The OCI `linux.seccomp` object. runc skips names this kernel/libseccomp does not know. */
export function buildSeccompProfile(arch: string = process.arch): Record<string, unknown> {
  return {
    defaultAction: "SCMP_ACT_ALLOW",
    architectures: ARCHITECTURES[arch] ?? [],
    syscalls: [{ names: [...DENIED_SYSCALLS], action: "SCMP_ACT_ERRNO", errnoRet: 1 }],
  };
}
