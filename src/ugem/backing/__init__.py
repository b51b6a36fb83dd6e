"""Backing stores: where object pages and fds really live (memfds now, spill files later)."""
