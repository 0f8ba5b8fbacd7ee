"""Code generated from Warden's protobuf API (``proto/``); regenerate with ``make proto``."""
