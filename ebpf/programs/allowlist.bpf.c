// SPDX-License-Identifier: GPL-2.0
/* consolegate's outbound allow-list: cgroup connect4/connect6 programs.
 *
 * Attached to the proxy's own cgroup v2. A TCP connect() from a process in
 * that cgroup succeeds only if its (address, port) is in ALLOW_V4 /
 * ALLOW_V6, which the proxy keeps in sync with its token table; anything
 * else fails with EPERM, even from a code path that forgot to check.
 * Non-TCP sockets (e.g. UDP to the DNS resolver) are not filtered.
 * A dual-stack socket connecting to ::ffff:a.b.c.d goes through connect6:
 * those are looked up in the v4 table. */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "allowlist.h"

#define SOCK_STREAM 1

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ALLOW_MAX_ENTRIES);
	__type(key, struct allow_v4);
	__type(value, __u8);
} ALLOW_V4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ALLOW_MAX_ENTRIES);
	__type(key, struct allow_v6);
	__type(value, __u8);
} ALLOW_V6 SEC(".maps");

/* 1 lets the connect() go on, 0 makes it fail with EPERM. */
#define ALLOW 1
#define DENY 0

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return ALLOW;
	struct allow_v4 key = {};
	key.addr = ctx->user_ip4;
	key.port = ctx->user_port;
	return bpf_map_lookup_elem(&ALLOW_V4, &key) ? ALLOW : DENY;
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return ALLOW;
	/* Element by element: the verifier rejects an array copy of user_ip6
	 * ("dereference of modified ctx ptr"). */
	__u32 a0 = ctx->user_ip6[0];
	__u32 a1 = ctx->user_ip6[1];
	__u32 a2 = ctx->user_ip6[2];
	__u32 a3 = ctx->user_ip6[3];
	__u32 port = ctx->user_port;
	/* ::ffff:a.b.c.d (network order words 0, 0, 0x0000ffff, a.b.c.d). */
	if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0x0000ffff)) {
		struct allow_v4 key4 = {};
		key4.addr = a3;
		key4.port = port;
		return bpf_map_lookup_elem(&ALLOW_V4, &key4) ? ALLOW : DENY;
	}
	struct allow_v6 key = {};
	key.addr[0] = a0;
	key.addr[1] = a1;
	key.addr[2] = a2;
	key.addr[3] = a3;
	key.port = port;
	return bpf_map_lookup_elem(&ALLOW_V6, &key) ? ALLOW : DENY;
}

char LICENSE[] SEC("license") = "GPL";
