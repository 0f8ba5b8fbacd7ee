"""Protocol adapters: one wire format each, no I/O."""
