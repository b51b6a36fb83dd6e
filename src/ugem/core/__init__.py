"""The core: objects, handles, names, clients and the request table.

Layer rule (checked by tests/unit/test_layering.py): nothing under ugem.core, ugem.mm or
ugem.wire imports socket, selectors, signal, threading or mmap, and the core never calls
os.* on an fd: all memory I/O goes through the BackingStore protocol it is given.
"""
