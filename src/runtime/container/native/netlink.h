/*
 * netlink.h: a sandbox's network namespace and veth pair made and removed through rtnetlink,
 * in the helper, instead of `ip -batch` runs (NETNS_NETLINK_NOTE in src/network/netns-manager.ts).
 * Included by sandbox-helper.c after its fail(), usage(), option() and `step`.
 *
 *   net-setup   --name NAME --host-if IF --host-addr A --sandbox-addr B --prefix N
 *       Makes /var/run/netns/NAME as `ip netns add` does, a veth pair IF <-> eth0 with eth0
 *       created inside it, A/N on IF (up), and inside: lo up, B/N on eth0 (up), a default
 *       route via A, net.ipv4.ip_unprivileged_port_start=0 and IPv6 off on eth0. On failure
 *       what it made is removed again.
 *   net-release --name NAME --host-if IF
 *       Deletes IF (and so its peer) and the namespace, as `ip link del` + `ip netns del`;
 *       either being absent already is not an error.
 *   net-address --name NAME
 *       Prints eth0's first IPv4 address in the namespace, or nothing.
 *   net-guest-tap --name NAME --tap TAP --gateway A --prefix N --nft-file FILE
 *       A microVM's side of the namespace (GUEST_NETWORK_NOTE in src/runtime/microvm/net.ts), as
 *       `sysctl -w`, `ip tuntap add`, `ip address add`, `ip link set up` and `nft -f` did from
 *       three processes: inside NAME, IPv6 off for new links, forwarding on, ICMP redirects off;
 *       a persistent tap TAP (mode tap, no packet info; an earlier one of that name is replaced)
 *       with A/N on it, up; then this process becomes `nft -f FILE` in the namespace (its exit
 *       status is the subcommand's).
 *       With --from SPARE --from-tap T: the tap is not made but taken, the tap T that a QEMU
 *       started ahead opened in the namespace SPARE (SPARE_QEMU_NOTE in
 *       src/runtime/microvm/spare-qemus.ts): moved into NAME (after the sysctls, so it gets
 *       NAME's defaults), renamed TAP there, then addressed and set up as above.
 *   net-guest-release --name NAME --tap TAP --table T
 *       Deletes TAP and the `ip` table T in the namespace (`nft delete table`: this process
 *       becomes nft); the tap being gone is no error. A gone namespace is nothing to do.
 *
 * Every step is bounded: netlink answers are awaited with a receive timeout, buffers are fixed.
 * The process's network namespace is restored before a subcommand returns, and nothing here
 * keeps state between calls (a resident helper runs them in a child per request).
 */
#include <arpa/inet.h>
#include <linux/if_addr.h>
#include <linux/if_link.h>
#include <linux/if_tun.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/veth.h>
#include <net/if.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/time.h>

#define NETNS_RUN_DIR "/var/run/netns"
/* The sandbox end of the veth, inside its namespace (SANDBOX_INTERFACE in netns-manager.ts). */
#define NET_SANDBOX_IF "eth0"
/* A new network namespace's loopback always has index 1 (LOOPBACK_IFINDEX). */
#define NET_LOOPBACK_INDEX 1
#define NET_NAME_MAX 128
/* The kernel answers rtnetlink requests synchronously; this only bounds a wedged kernel. */
#define NET_TIMEOUT_SEC 10

struct net_request {
  struct nlmsghdr header;
  char data[1024 - sizeof(struct nlmsghdr)];
};

/* ---- arguments ---- */

/* Refuses options that the subcommand does not take (a typo must not be ignored). */
static void net_only_options(int argc, char **argv, const char *const *known) {
  for (int i = 2; i < argc; i += 2) {
    int found = 0;
    for (const char *const *k = known; *k; k++)
      if (strcmp(argv[i], *k) == 0) found = 1;
    if (!found) {
      fprintf(stderr, "sandbox-helper: %s does not take %s\n", argv[1], argv[i]);
      leave(2);
    }
  }
}

/* A namespace file name: a letter or digit, then letters, digits, _ or - (checkSandboxId's alphabet). */
static int net_netns_name_ok(const char *name) {
  size_t length = strlen(name);
  int ok = length > 0 && length <= NET_NAME_MAX && isalnum((unsigned char)name[0]);
  for (size_t i = 0; ok && i < length; i++) ok = isalnum((unsigned char)name[i]) || name[i] == '_' || name[i] == '-';
  return ok;
}

static const char *net_netns_name(int argc, char **argv) {
  const char *name = option(argc, argv, "--name", 1);
  if (!net_netns_name_ok(name)) usage("--name must be 1-128 letters, digits, _ or -, starting with a letter or digit");
  return name;
}

/* A host interface name: 1-15 lowercase letters or digits (IFNAMSIZ - 1), never eth0 or lo. */
static const char *net_interface_name(int argc, char **argv) {
  const char *name = option(argc, argv, "--host-if", 1);
  size_t length = strlen(name);
  int ok = length > 0 && length < IFNAMSIZ;
  for (size_t i = 0; ok && i < length; i++) ok = (name[i] >= 'a' && name[i] <= 'z') || (name[i] >= '0' && name[i] <= '9');
  if (!ok) usage("--host-if must be 1-15 lowercase letters or digits");
  if (strcmp(name, NET_SANDBOX_IF) == 0 || strcmp(name, "lo") == 0) usage("--host-if may not be eth0 or lo");
  return name;
}

/* A dotted-quad IPv4 address (inet_pton: four decimal parts, no leading zeros). */
static struct in_addr net_address(int argc, char **argv, const char *name) {
  const char *text = option(argc, argv, name, 1);
  struct in_addr address;
  if (strlen(text) > 15 || inet_pton(AF_INET, text, &address) != 1) {
    fprintf(stderr, "sandbox-helper: %s is not a dotted-quad IPv4 address: %s\n", name, text);
    leave(2);
  }
  return address;
}

/* ---- rtnetlink ---- */

static void net_request_init(struct net_request *request, int type, int flags, const void *body, size_t length) {
  memset(request, 0, sizeof *request);
  request->header.nlmsg_len = (uint32_t)NLMSG_LENGTH(length);
  request->header.nlmsg_type = (uint16_t)type;
  request->header.nlmsg_flags = (uint16_t)(NLM_F_REQUEST | flags);
  memcpy(NLMSG_DATA(&request->header), body, length);
}

/* Appends an attribute; the buffer is sized for the largest request here, so overflow is a bug. */
static struct rtattr *net_attr(struct net_request *request, int type, const void *data, size_t length) {
  size_t at = NLMSG_ALIGN(request->header.nlmsg_len);
  if (at + RTA_SPACE(length) > sizeof *request) abort();
  struct rtattr *attr = (struct rtattr *)((char *)request + at);
  attr->rta_type = (unsigned short)type;
  attr->rta_len = (unsigned short)RTA_LENGTH(length);
  if (length) memcpy(RTA_DATA(attr), data, length);
  request->header.nlmsg_len = (uint32_t)(at + RTA_SPACE(length));
  return attr;
}

static struct rtattr *net_nest(struct net_request *request, int type) { return net_attr(request, type, NULL, 0); }

static void net_nest_end(struct net_request *request, struct rtattr *nest) {
  nest->rta_len = (unsigned short)((char *)request + request->header.nlmsg_len - (char *)nest);
}

/* A NETLINK_ROUTE socket in the caller's current network namespace. */
static int net_socket(void) {
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
  if (fd < 0) return -1;
  struct timeval timeout = {.tv_sec = NET_TIMEOUT_SEC};
  int one = 1;
  struct sockaddr_nl local = {.nl_family = AF_NETLINK};
  if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) != 0 || bind(fd, (struct sockaddr *)&local, sizeof local) != 0) {
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
  }
  /* The kernel's own words for a refusal ("Nexthop has invalid gateway"), without the request echoed. */
  setsockopt(fd, SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof one);
  setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one);
  return fd;
}

/* The kernel's extended-ack message of an error answer, if it gave one. */
static void net_report_ext_ack(const struct nlmsghdr *answer) {
  if (!(answer->nlmsg_flags & NLM_F_ACK_TLVS)) return;
  size_t offset = NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(struct nlmsgerr));
  if (answer->nlmsg_len <= offset) return;
  const struct rtattr *attr = (const struct rtattr *)((const char *)answer + offset);
  int left = (int)(answer->nlmsg_len - offset);
  for (; RTA_OK(attr, left); attr = RTA_NEXT(attr, left)) {
    if (attr->rta_type != NLMSGERR_ATTR_MSG || RTA_PAYLOAD(attr) == 0) continue;
    const char *text = RTA_DATA(attr);
    fprintf(stderr, "sandbox-helper: %s: kernel says: %.*s\n", step, (int)strnlen(text, RTA_PAYLOAD(attr)), text);
  }
}

typedef int (*net_reply_fn)(const struct nlmsghdr *message, void *context);

/*
 * Receives one datagram from the kernel into `buffer`, skipping what any other sender sent to
 * our port (only the kernel speaks for the kernel). Returns its length, or -1 with errno set
 * (ETIMEDOUT when the receive timeout passed, EMSGSIZE when it did not fit).
 */
static ssize_t net_receive(int fd, char *buffer, size_t size) {
  for (;;) {
    struct sockaddr_nl from;
    socklen_t from_length = sizeof from;
    ssize_t got = recvfrom(fd, buffer, size, MSG_TRUNC, (struct sockaddr *)&from, &from_length);
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) errno = ETIMEDOUT;
      return -1;
    }
    if ((size_t)got > size) {
      errno = EMSGSIZE;
      return -1;
    }
    if (from_length == sizeof from && from.nl_pid == 0) return got;
  }
}

/*
 * Sends a request and reads answers until its ack (or, for a dump, NLMSG_DONE), passing each
 * other message with the request's sequence number to `reply`. Returns 0, or -1 with errno set
 * (the kernel's error for a refused request, ETIMEDOUT/EAGAIN for no answer in time).
 */
static int net_talk(int fd, struct net_request *request, net_reply_fn reply, void *context) {
  static uint32_t sequence;
  request->header.nlmsg_seq = ++sequence;
  int dump = (request->header.nlmsg_flags & NLM_F_DUMP) == NLM_F_DUMP;
  if (!dump) request->header.nlmsg_flags |= NLM_F_ACK;
  struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
  if (sendto(fd, request, request->header.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) != (ssize_t)request->header.nlmsg_len) return -1;
  static char buffer[32768] __attribute__((aligned(NLMSG_ALIGNTO)));
  for (;;) {
    ssize_t got = net_receive(fd, buffer, sizeof buffer);
    if (got < 0) return -1;
    int left = (int)got;
    for (struct nlmsghdr *message = (struct nlmsghdr *)buffer; NLMSG_OK(message, left); message = NLMSG_NEXT(message, left)) {
      if (message->nlmsg_seq != request->header.nlmsg_seq) continue;
      if (message->nlmsg_type == NLMSG_DONE) return 0;
      if (message->nlmsg_type == NLMSG_ERROR) {
        if (message->nlmsg_len < NLMSG_LENGTH(sizeof(struct nlmsgerr))) {
          errno = EPROTO;
          return -1;
        }
        const struct nlmsgerr *error = NLMSG_DATA(message);
        if (error->error == 0) return 0;
        net_report_ext_ack(message);
        errno = -error->error;
        return -1;
      }
      if (reply && reply(message, context) != 0) return -1;
    }
  }
}

static int net_link_index_reply(const struct nlmsghdr *message, void *context) {
  if (message->nlmsg_type == RTM_NEWLINK && message->nlmsg_len >= NLMSG_LENGTH(sizeof(struct ifinfomsg)))
    *(int *)context = ((const struct ifinfomsg *)NLMSG_DATA(message))->ifi_index;
  return 0;
}

/* The index of interface `name` in the socket's namespace, or -1 (errno ENODEV when absent). */
static int net_link_index(int fd, const char *name) {
  struct ifinfomsg info = {.ifi_family = AF_UNSPEC};
  struct net_request request;
  net_request_init(&request, RTM_GETLINK, 0, &info, sizeof info);
  net_attr(&request, IFLA_IFNAME, name, strlen(name) + 1);
  int index = 0;
  if (net_talk(fd, &request, net_link_index_reply, &index) != 0) return -1;
  if (index <= 0) {
    errno = ENODEV;
    return -1;
  }
  return index;
}

static int net_link_up(int fd, int index) {
  struct ifinfomsg info = {.ifi_family = AF_UNSPEC, .ifi_index = index, .ifi_flags = IFF_UP, .ifi_change = IFF_UP};
  struct net_request request;
  net_request_init(&request, RTM_NEWLINK, 0, &info, sizeof info);
  return net_talk(fd, &request, NULL, NULL);
}

/* `ip addr add A/N dev X`: local and address both A, scope global, no broadcast. */
static int net_address_add(int fd, int index, struct in_addr address, int prefix) {
  struct ifaddrmsg message = {.ifa_family = AF_INET, .ifa_prefixlen = (unsigned char)prefix, .ifa_scope = RT_SCOPE_UNIVERSE, .ifa_index = (unsigned)index};
  struct net_request request;
  net_request_init(&request, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &message, sizeof message);
  net_attr(&request, IFA_LOCAL, &address, sizeof address);
  net_attr(&request, IFA_ADDRESS, &address, sizeof address);
  return net_talk(fd, &request, NULL, NULL);
}

/* `ip route add default via G`: main table, protocol boot, the kernel finds the device. */
static int net_default_route(int fd, struct in_addr gateway) {
  struct rtmsg message = {
      .rtm_family = AF_INET, .rtm_table = RT_TABLE_MAIN, .rtm_protocol = RTPROT_BOOT, .rtm_scope = RT_SCOPE_UNIVERSE, .rtm_type = RTN_UNICAST};
  struct net_request request;
  net_request_init(&request, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &message, sizeof message);
  net_attr(&request, RTA_GATEWAY, &gateway, sizeof gateway);
  return net_talk(fd, &request, NULL, NULL);
}

/* `ip link add HOST type veth peer name eth0 netns NS`: the peer is born in the namespace. */
static int net_veth_add(int fd, const char *host_if, int netns_fd) {
  struct ifinfomsg info = {.ifi_family = AF_UNSPEC};
  struct net_request request;
  net_request_init(&request, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &info, sizeof info);
  net_attr(&request, IFLA_IFNAME, host_if, strlen(host_if) + 1);
  struct rtattr *link_info = net_nest(&request, IFLA_LINKINFO);
  net_attr(&request, IFLA_INFO_KIND, "veth", 4);
  struct rtattr *data = net_nest(&request, IFLA_INFO_DATA);
  struct rtattr *peer = net_nest(&request, VETH_INFO_PEER);
  /* VETH_INFO_PEER holds an ifinfomsg, then the peer's own attributes. */
  struct ifinfomsg peer_info = {.ifi_family = AF_UNSPEC};
  size_t at = NLMSG_ALIGN(request.header.nlmsg_len);
  if (at + NLMSG_ALIGN(sizeof peer_info) > sizeof request) abort();
  memcpy((char *)&request + at, &peer_info, sizeof peer_info);
  request.header.nlmsg_len = (uint32_t)(at + NLMSG_ALIGN(sizeof peer_info));
  net_attr(&request, IFLA_IFNAME, NET_SANDBOX_IF, sizeof NET_SANDBOX_IF);
  uint32_t ns = (uint32_t)netns_fd;
  net_attr(&request, IFLA_NET_NS_FD, &ns, sizeof ns);
  net_nest_end(&request, peer);
  net_nest_end(&request, data);
  net_nest_end(&request, link_info);
  return net_talk(fd, &request, NULL, NULL);
}

/* Deletes interface `name` (its veth peer goes with it); 0 when it was not there. */
static int net_link_delete(int fd, const char *name) {
  struct ifinfomsg info = {.ifi_family = AF_UNSPEC};
  struct net_request request;
  net_request_init(&request, RTM_DELLINK, 0, &info, sizeof info);
  net_attr(&request, IFLA_IFNAME, name, strlen(name) + 1);
  if (net_talk(fd, &request, NULL, NULL) == 0 || errno == ENODEV) return 0;
  return -1;
}

/* ---- namespaces ---- */

static void net_path(char *out, size_t size, const char *name) {
  if ((size_t)snprintf(out, size, "%s/%s", NETNS_RUN_DIR, name) >= size) usage("--name is too long");
}

/*
 * `ip netns add`'s preparation of /var/run/netns: a shared mount (bind-mounted on itself first
 * when it is not a mount point yet), so that a namespace file unmounted in one mount namespace
 * is unmounted in all; done under a lock on the directory, as iproute2 does, because parallel
 * first runs would otherwise stack bind mounts.
 */
static int net_run_dir(void) {
  if (mkdir(NETNS_RUN_DIR, 0755) != 0 && errno != EEXIST) return -1;
  int lock = open(NETNS_RUN_DIR, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (lock < 0) return -1;
  /* Like iproute2, go on without the lock rather than fail. */
  int locked = flock(lock, LOCK_EX) == 0;
  int made = 0, result = 0;
  while (mount("", NETNS_RUN_DIR, "none", MS_SHARED | MS_REC, NULL) != 0) {
    if (errno != EINVAL || made || mount(NETNS_RUN_DIR, NETNS_RUN_DIR, "none", MS_BIND | MS_REC, NULL) != 0) {
      result = -1;
      break;
    }
    made = 1;
  }
  int saved = errno;
  if (locked) flock(lock, LOCK_UN);
  close(lock);
  errno = saved;
  return result;
}

/* `ip netns del`: detach the namespace's bind mount and remove its file; 0 when absent. */
static int net_netns_delete(const char *path) {
  umount2(path, MNT_DETACH);
  if (unlink(path) == 0 || errno == ENOENT) return 0;
  return -1;
}

static int net_write_sysctl(const char *path, const char *value) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t length = (ssize_t)strlen(value);
  int result = write(fd, value, (size_t)length) == length ? 0 : -1;
  int saved = errno;
  close(fd);
  errno = saved;
  return result;
}

/* What net-setup made so far, undone in reverse on failure. */
struct net_made {
  char path[sizeof NETNS_RUN_DIR + NET_NAME_MAX + 2];
  int file, mounted, veth;
  const char *host_if;
  int host_socket, home_netns;
};

static void net_undo(struct net_made *made) {
  int saved = errno;
  if (made->home_netns >= 0) setns(made->home_netns, CLONE_NEWNET);
  if (made->veth && made->host_socket >= 0) net_link_delete(made->host_socket, made->host_if);
  if (made->mounted) umount2(made->path, MNT_DETACH);
  if (made->file) unlink(made->path);
  errno = saved;
}

static int cmd_net_setup(int argc, char **argv) {
  static const char *const known[] = {"--name", "--host-if", "--host-addr", "--sandbox-addr", "--prefix", NULL};
  step = "net-setup";
  net_only_options(argc, argv, known);
  const char *name = net_netns_name(argc, argv);
  const char *host_if = net_interface_name(argc, argv);
  struct in_addr host_address = net_address(argc, argv, "--host-addr");
  struct in_addr sandbox_address = net_address(argc, argv, "--sandbox-addr");
  unsigned long long prefix = number(option(argc, argv, "--prefix", 1), "--prefix");
  if (prefix > 32) usage("--prefix must be 0-32");
  uint32_t mask = prefix == 0 ? 0 : htonl(~0u << (32 - prefix));
  if (host_address.s_addr == sandbox_address.s_addr) usage("--host-addr and --sandbox-addr must differ");
  /* The default route goes through the host address: it must be on the link. */
  if ((host_address.s_addr & mask) != (sandbox_address.s_addr & mask)) usage("--host-addr and --sandbox-addr must share the prefix");

  struct net_made made = {.host_if = host_if, .host_socket = -1, .home_netns = -1};
  net_path(made.path, sizeof made.path, name);
  const char *what = "";
  int netns_fd = -1, inner_socket = -1;
#define NET_TRY(condition, description) \
  do {                                  \
    what = (description);               \
    if (!(condition)) goto failed;      \
  } while (0)

  step = "net-setup namespace";
  NET_TRY((made.home_netns = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)) >= 0, "opening this process's network namespace");
  NET_TRY((made.host_socket = net_socket()) >= 0, "opening a netlink socket");
  NET_TRY(net_run_dir() == 0, "making " NETNS_RUN_DIR " a shared mount");
  int file = open(made.path, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0);
  NET_TRY(file >= 0, made.path);
  close(file);
  made.file = 1;
  NET_TRY(unshare(CLONE_NEWNET) == 0, "unshare(CLONE_NEWNET)");
  NET_TRY(mount("/proc/thread-self/ns/net", made.path, "none", MS_BIND, NULL) == 0, "binding the namespace to its file");
  made.mounted = 1;
  NET_TRY((netns_fd = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)) >= 0, "opening the new network namespace");
  /* Opened while in the namespace: this socket configures the namespace, wherever we are later. */
  NET_TRY((inner_socket = net_socket()) >= 0, "opening a netlink socket in the namespace");

  step = "net-setup veth";
  NET_TRY(net_veth_add(made.host_socket, host_if, netns_fd) == 0, "creating the veth pair");
  made.veth = 1;
  int host_index = net_link_index(made.host_socket, host_if);
  NET_TRY(host_index > 0, "finding the host end of the veth");
  NET_TRY(net_address_add(made.host_socket, host_index, host_address, (int)prefix) == 0, "addressing the host end");
  NET_TRY(net_link_up(made.host_socket, host_index) == 0, "setting the host end up");

  /*
   * /proc/sys/net resolves to the network namespace of the process that opens the file (the
   * sysctl root's lookup uses current's nsproxy), so these are written while still inside. The
   * sandbox's root is in a user namespace that does not own this netns, so it has no
   * CAP_NET_BIND_SERVICE here: let everyone bind low ports instead.
   */
  step = "net-setup sysctl";
  NET_TRY(net_write_sysctl("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0\n") == 0, "net.ipv4.ip_unprivileged_port_start");
  NET_TRY(net_write_sysctl("/proc/sys/net/ipv6/conf/" NET_SANDBOX_IF "/disable_ipv6", "1\n") == 0, "net.ipv6.conf." NET_SANDBOX_IF ".disable_ipv6");

  step = "net-setup sandbox side";
  NET_TRY(net_link_up(inner_socket, NET_LOOPBACK_INDEX) == 0, "setting lo up");
  int sandbox_index = net_link_index(inner_socket, NET_SANDBOX_IF);
  NET_TRY(sandbox_index > 0, "finding " NET_SANDBOX_IF " in the namespace");
  NET_TRY(net_address_add(inner_socket, sandbox_index, sandbox_address, (int)prefix) == 0, "addressing " NET_SANDBOX_IF);
  NET_TRY(net_link_up(inner_socket, sandbox_index) == 0, "setting " NET_SANDBOX_IF " up");
  NET_TRY(net_default_route(inner_socket, host_address) == 0, "adding the default route");
  NET_TRY(setns(made.home_netns, CLONE_NEWNET) == 0, "returning to the host's network namespace");
#undef NET_TRY

  close(inner_socket);
  close(netns_fd);
  close(made.host_socket);
  close(made.home_netns);
  return 0;

failed:;
  int saved = errno;
  if (inner_socket >= 0) close(inner_socket);
  if (netns_fd >= 0) close(netns_fd);
  net_undo(&made);
  if (made.host_socket >= 0) close(made.host_socket);
  if (made.home_netns >= 0) close(made.home_netns);
  errno = saved;
  fail(what);
  return 1;
}

static int cmd_net_release(int argc, char **argv) {
  static const char *const known[] = {"--name", "--host-if", NULL};
  step = "net-release";
  net_only_options(argc, argv, known);
  const char *name = net_netns_name(argc, argv);
  const char *host_if = net_interface_name(argc, argv);
  char path[sizeof NETNS_RUN_DIR + NET_NAME_MAX + 2];
  net_path(path, sizeof path, name);
  /* The veth first: namespace teardown is asynchronous, and its host end would linger. */
  int fd = net_socket();
  if (fd < 0) fail("opening a netlink socket");
  if (net_link_delete(fd, host_if) != 0) fail("deleting the host end of the veth");
  close(fd);
  if (net_netns_delete(path) != 0) fail(path);
  return 0;
}

static int net_address_reply(const struct nlmsghdr *message, void *context) {
  struct {
    int index;
    char text[INET_ADDRSTRLEN];
  } *found = context;
  if (message->nlmsg_type != RTM_NEWADDR || found->text[0] || message->nlmsg_len < NLMSG_LENGTH(sizeof(struct ifaddrmsg))) return 0;
  const struct ifaddrmsg *address = NLMSG_DATA(message);
  if (address->ifa_family != AF_INET || (int)address->ifa_index != found->index) return 0;
  int left = (int)IFA_PAYLOAD(message);
  for (const struct rtattr *attr = IFA_RTA(address); RTA_OK(attr, left); attr = RTA_NEXT(attr, left))
    if (attr->rta_type == IFA_LOCAL && RTA_PAYLOAD(attr) == 4) inet_ntop(AF_INET, RTA_DATA(attr), found->text, sizeof found->text);
  return 0;
}

static int cmd_net_address(int argc, char **argv) {
  static const char *const known[] = {"--name", NULL};
  step = "net-address";
  net_only_options(argc, argv, known);
  const char *name = net_netns_name(argc, argv);
  char path[sizeof NETNS_RUN_DIR + NET_NAME_MAX + 2];
  net_path(path, sizeof path, name);
  int netns_fd = open(path, O_RDONLY | O_CLOEXEC);
  if (netns_fd < 0) {
    if (errno == ENOENT) return 0;
    fail(path);
  }
  int home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
  if (home < 0) fail("opening this process's network namespace");
  /* A file that is not a bound namespace (a half-made one) has no address: nothing to print. */
  if (setns(netns_fd, CLONE_NEWNET) != 0) {
    if (errno != EINVAL) fail("entering the namespace");
    close(home);
    close(netns_fd);
    return 0;
  }
  int fd = net_socket();
  int saved = errno;
  if (setns(home, CLONE_NEWNET) != 0) fail("returning to the host's network namespace");
  close(home);
  close(netns_fd);
  errno = saved;
  if (fd < 0) fail("opening a netlink socket in the namespace");
  struct {
    int index;
    char text[INET_ADDRSTRLEN];
  } found = {0, ""};
  found.index = net_link_index(fd, NET_SANDBOX_IF);
  if (found.index < 0) {
    if (errno != ENODEV) fail("finding " NET_SANDBOX_IF);
    close(fd);
    return 0;
  }
  struct ifaddrmsg message = {.ifa_family = AF_INET};
  struct net_request request;
  net_request_init(&request, RTM_GETADDR, NLM_F_DUMP, &message, sizeof message);
  if (net_talk(fd, &request, net_address_reply, &found) != 0) fail("listing addresses");
  close(fd);
  if (found.text[0]) printf("%s\n", found.text);
  return 0;
}

/* ---- a microVM's tap ---- */

/* An interface name for a tap: 1-15 lowercase letters or digits, never eth0 or lo. */
static const char *net_tap_option(int argc, char **argv, const char *option_name, int required) {
  const char *name = option(argc, argv, option_name, required);
  if (!name) return NULL;
  size_t length = strlen(name);
  int ok = length > 0 && length < IFNAMSIZ && name[0] >= 'a' && name[0] <= 'z';
  for (size_t i = 0; ok && i < length; i++) ok = (name[i] >= 'a' && name[i] <= 'z') || (name[i] >= '0' && name[i] <= '9');
  static char message[96];
  if (!ok) {
    snprintf(message, sizeof message, "%s must be 1-15 lowercase letters or digits, starting with a letter", option_name);
    usage(message);
  }
  if (strcmp(name, NET_SANDBOX_IF) == 0 || strcmp(name, "lo") == 0) {
    snprintf(message, sizeof message, "%s may not be eth0 or lo", option_name);
    usage(message);
  }
  return name;
}

static const char *net_tap_name(int argc, char **argv) { return net_tap_option(argc, argv, "--tap", 1); }

/* `ip link set dev INDEX netns FD`: the link leaves the socket's namespace for the one FD names. */
static int net_link_move(int fd, int index, int netns_fd) {
  struct ifinfomsg info = {.ifi_family = AF_UNSPEC, .ifi_index = index};
  struct net_request request;
  net_request_init(&request, RTM_NEWLINK, 0, &info, sizeof info);
  uint32_t ns = (uint32_t)netns_fd;
  net_attr(&request, IFLA_NET_NS_FD, &ns, sizeof ns);
  return net_talk(fd, &request, NULL, NULL);
}

/* `ip link set dev INDEX name NAME` (the link must be down). */
static int net_link_rename(int fd, int index, const char *name) {
  struct ifinfomsg info = {.ifi_family = AF_UNSPEC, .ifi_index = index};
  struct net_request request;
  net_request_init(&request, RTM_NEWLINK, 0, &info, sizeof info);
  net_attr(&request, IFLA_IFNAME, name, strlen(name) + 1);
  return net_talk(fd, &request, NULL, NULL);
}

/* Enters the namespace file NAME (this process stays there); 1 when it does not exist. */
static int net_enter_named(const char *name) {
  char path[sizeof NETNS_RUN_DIR + NET_NAME_MAX + 2];
  net_path(path, sizeof path, name);
  int netns_fd = open(path, O_RDONLY | O_CLOEXEC);
  if (netns_fd < 0) {
    if (errno == ENOENT) return 1;
    fail(path);
  }
  if (setns(netns_fd, CLONE_NEWNET) != 0) fail("entering the namespace");
  close(netns_fd);
  return 0;
}

/* Becomes `nft ARGS...` (PATH lookup); only returns by failing. */
static void net_become_nft(char *const *argv) {
  fflush(stdout);
  fflush(stderr);
  execvp("nft", argv);
  fail("running nft");
}

/*
 * Only as a child of its own (the resident helper forks one per subcommand, INLINE_NOTE): it
 * leaves this process in the namespace and ends it by exec.
 */
static int cmd_net_guest_tap(int argc, char **argv) {
  static const char *const known[] = {"--name", "--tap", "--gateway", "--prefix", "--nft-file", "--from", "--from-tap", NULL};
  step = "net-guest-tap";
  net_only_options(argc, argv, known);
  const char *name = net_netns_name(argc, argv);
  const char *tap = net_tap_name(argc, argv);
  struct in_addr gateway = net_address(argc, argv, "--gateway");
  unsigned long long prefix = number(option(argc, argv, "--prefix", 1), "--prefix");
  if (prefix == 0 || prefix > 32) usage("--prefix must be 1-32");
  const char *nft_file = option(argc, argv, "--nft-file", 1);
  if (nft_file[0] != '/') usage("--nft-file must be an absolute path");
  const char *from = option(argc, argv, "--from", 0);
  const char *from_tap = net_tap_option(argc, argv, "--from-tap", 0);
  if ((from == NULL) != (from_tap == NULL)) usage("--from and --from-tap go together");
  if (from && !net_netns_name_ok(from)) usage("--from must be 1-128 letters, digits, _ or -, starting with a letter or digit");
  if (from && strcmp(from, name) == 0) usage("--from must be another namespace than --name");
  /* The spare's namespace: a netlink socket opened there acts there wherever this process goes. */
  int from_socket = -1;
  if (from) {
    step = "net-guest-tap spare";
    if (net_enter_named(from) != 0) {
      errno = ENOENT;
      fail("the spare's namespace");
    }
    from_socket = net_socket();
    if (from_socket < 0) fail("opening a netlink socket in the spare's namespace");
  }
  if (net_enter_named(name) != 0) {
    errno = ENOENT;
    fail("the namespace");
  }
  /* New links inherit `default`: set before the tap exists. /proc/sys/net is the opener's namespace's. */
  step = "net-guest-tap sysctl";
  static const char *const sysctls[][2] = {
    {"/proc/sys/net/ipv6/conf/default/disable_ipv6", "1\n"},
    {"/proc/sys/net/ipv4/ip_forward", "1\n"},
    {"/proc/sys/net/ipv4/conf/all/send_redirects", "0\n"},
    {"/proc/sys/net/ipv4/conf/default/send_redirects", "0\n"},
  };
  for (size_t i = 0; i < sizeof sysctls / sizeof sysctls[0]; i++) {
    /* A host without IPv6 has no such file: nothing to turn off. */
    if (net_write_sysctl(sysctls[i][0], sysctls[i][1]) != 0 && !(errno == ENOENT && strstr(sysctls[i][0], "ipv6"))) fail(sysctls[i][0]);
  }
  step = "net-guest-tap tap";
  int fd = net_socket();
  if (fd < 0) fail("opening a netlink socket in the namespace");
  /* A tap left by an earlier guest of this sandbox (a restore into the same network) goes first. */
  if (net_link_delete(fd, tap) != 0) fail("removing an earlier tap");
  if (from) {
    /* The spare's own tap (its QEMU holds it open): here, under the name the ruleset expects. */
    int spare_index = net_link_index(from_socket, from_tap);
    if (spare_index <= 0) fail("finding the spare's tap");
    int here = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (here < 0) fail("opening the namespace");
    if (net_link_move(from_socket, spare_index, here) != 0) fail("moving the spare's tap into the namespace");
    close(here);
    close(from_socket);
    int moved = net_link_index(fd, from_tap);
    if (moved <= 0) fail("finding the moved tap");
    if (strcmp(from_tap, tap) != 0 && net_link_rename(fd, moved, tap) != 0) fail("renaming the moved tap");
  } else {
    int tun = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (tun < 0) fail("/dev/net/tun");
    struct ifreq request;
    memset(&request, 0, sizeof request);
    request.ifr_flags = IFF_TAP | IFF_NO_PI;
    memcpy(request.ifr_name, tap, strlen(tap) + 1);
    if (ioctl(tun, TUNSETIFF, &request) != 0) fail("TUNSETIFF");
    if (ioctl(tun, TUNSETPERSIST, 1) != 0) fail("TUNSETPERSIST");
    close(tun);
  }
  int index = net_link_index(fd, tap);
  if (index <= 0) fail("finding the tap");
  if (net_address_add(fd, index, gateway, (int)prefix) != 0) fail("addressing the tap");
  if (net_link_up(fd, index) != 0) fail("setting the tap up");
  close(fd);
  step = "net-guest-tap nft";
  char *nft_argv[] = {"nft", "-f", (char *)nft_file, NULL};
  net_become_nft(nft_argv);
  return 1;
}

static int cmd_net_guest_release(int argc, char **argv) {
  static const char *const known[] = {"--name", "--tap", "--table", NULL};
  step = "net-guest-release";
  net_only_options(argc, argv, known);
  const char *name = net_netns_name(argc, argv);
  const char *tap = net_tap_name(argc, argv);
  const char *table = option(argc, argv, "--table", 1);
  size_t length = strlen(table);
  int ok = length > 0 && length <= 32 && table[0] >= 'a' && table[0] <= 'z';
  for (size_t i = 0; ok && i < length; i++) ok = (table[i] >= 'a' && table[i] <= 'z') || (table[i] >= '0' && table[i] <= '9') || table[i] == '_';
  if (!ok) usage("--table must be 1-32 lowercase letters, digits or _, starting with a letter");
  if (net_enter_named(name) != 0) return 0;
  int fd = net_socket();
  if (fd < 0) fail("opening a netlink socket in the namespace");
  if (net_link_delete(fd, tap) != 0) fail("removing the tap");
  close(fd);
  /* Declared, then deleted: no error when it was gone already. */
  char *nft_argv[] = {"nft", "add", "table", "ip", (char *)table, ";", "delete", "table", "ip", (char *)table, NULL};
  net_become_nft(nft_argv);
  return 1;
}
