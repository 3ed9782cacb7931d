/* Map keys of the sockmap data path.
 *
 * The Rust side (ebpf/src/lib.rs: SockKey) defines the same layout; the
 * SOCK_KEY_* numbers below are checked here at compile time against this
 * struct and in a Rust unit test against the Rust struct.
 *
 * A key is a socket's cookie (SO_COOKIE, bpf_get_socket_cookie): unique
 * per boot, never reused, and known to the program from the skb alone. */
#ifndef CONSOLEGATE_SOCKMAP_H
#define CONSOLEGATE_SOCKMAP_H

#include <linux/types.h>

struct sock_key {
	__u64 cookie;
};

#define SOCK_KEY_SIZE 8
#define SOCK_KEY_COOKIE_OFFSET 0

/* Entries per map: two per session. */
#define SOCK_MAX_ENTRIES 65536

_Static_assert(sizeof(struct sock_key) == SOCK_KEY_SIZE, "sock_key size");
_Static_assert(__builtin_offsetof(struct sock_key, cookie) == SOCK_KEY_COOKIE_OFFSET, "sock_key.cookie");

#endif
