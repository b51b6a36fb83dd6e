"""The daemon: the only layer with sockets, epoll, signals and peer credentials."""
