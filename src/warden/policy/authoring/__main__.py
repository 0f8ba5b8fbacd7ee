"""``python -m warden.policy.authoring <fd> [stack bytes]``: the tools' child process.

A module of its own, so that running it does not re-execute a module the
package has already imported. The engine's stack is set before the tools are
imported: setting it starts the process again (:func:`warden.policy.worker.set_stack`).
"""

import sys

if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 2 and all(a.isascii() and a.isdigit() for a in args):
        from warden.policy.worker import set_stack

        set_stack("warden.policy.authoring", args, int(args[1]))

    from warden.policy.authoring.child import main

    sys.exit(main(args))
