"""The web console: one page per role, served by the admin listener at ``/console/``.

Sign-in with an admin token (or a trusted auth proxy), then Decisions,
Approvals, Evidence, Model risk and Operations, each for its roles. No CDN,
no inline script; every asset ships in the package. See docs/console.md.
"""

from warden.console.app import Console
from warden.console.routes import console_app

__all__ = ["Console", "console_app"]
