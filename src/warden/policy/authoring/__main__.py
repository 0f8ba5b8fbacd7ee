"""``python -m warden.policy.authoring <fd>``: the tools' child process (see :mod:`.child`).

A module of its own, so that running it does not re-execute a module the
package has already imported.
"""

import sys

from warden.policy.authoring.child import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
