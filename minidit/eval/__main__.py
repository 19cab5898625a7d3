"""`python -m minidit.eval ...` (see minidit/eval/command.py)."""
from .command import main

if __name__ == "__main__":
    main()
