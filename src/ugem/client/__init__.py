"""The client side: the public Device API over an embedded or a socket transport."""
