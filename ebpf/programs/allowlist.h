/* Map keys of the connect4/connect6 allow-list.
 *
 * The Rust side (ebpf/src/lib.rs: AllowV4, AllowV6) defines the same
 * layout; the ALLOW_* numbers below are checked here at compile time
 * against these structs and in a Rust unit test against the Rust structs,
 * so the two cannot drift apart.
 *
 * Address and port are in network byte order, exactly as they appear in
 * struct bpf_sock_addr (user_ip4, user_ip6[4], user_port). */
#ifndef CONSOLEGATE_ALLOWLIST_H
#define CONSOLEGATE_ALLOWLIST_H

#include <linux/types.h>

struct allow_v4 {
	__u32 addr;
	__u32 port;
};

struct allow_v6 {
	__u32 addr[4];
	__u32 port;
};

#define ALLOW_V4_SIZE 8
#define ALLOW_V4_ADDR_OFFSET 0
#define ALLOW_V4_PORT_OFFSET 4
#define ALLOW_V6_SIZE 20
#define ALLOW_V6_ADDR_OFFSET 0
#define ALLOW_V6_PORT_OFFSET 16

/* Entries per map. */
#define ALLOW_MAX_ENTRIES 65536

_Static_assert(sizeof(struct allow_v4) == ALLOW_V4_SIZE, "allow_v4 size");
_Static_assert(__builtin_offsetof(struct allow_v4, addr) == ALLOW_V4_ADDR_OFFSET, "allow_v4.addr");
_Static_assert(__builtin_offsetof(struct allow_v4, port) == ALLOW_V4_PORT_OFFSET, "allow_v4.port");
_Static_assert(sizeof(struct allow_v6) == ALLOW_V6_SIZE, "allow_v6 size");
_Static_assert(__builtin_offsetof(struct allow_v6, addr) == ALLOW_V6_ADDR_OFFSET, "allow_v6.addr");
_Static_assert(__builtin_offsetof(struct allow_v6, port) == ALLOW_V6_PORT_OFFSET, "allow_v6.port");

#endif
