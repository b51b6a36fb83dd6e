"""The daemon: the only layer with sockets, selectors, signals and peer credentials."""
