"""`python -m serve_app.keys`: the API key and credit CLI, under the name users' scripts call.

The command itself is serve_app/accounts/keys_cli.py.
"""

import sys

from serve_app.accounts.keys_cli import main

if __name__ == "__main__":
    sys.exit(main())
