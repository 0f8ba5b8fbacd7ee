"""Code generated from Warden's protobuf API (``proto/``); regenerate with ``make proto``.

Also what client and server agree on beyond the messages' types.
"""

import re
from typing import Final

__all__ = ["ERROR_CODE"]

ERROR_CODE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
"""What ``ReportOutcomeRequest.error`` may hold: a code, stored unsealed (and indexed)."""
