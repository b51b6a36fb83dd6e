"""The wire protocol, sans-IO: bytes and fds in, frames out (no sockets here)."""
