"""`python -m minidit ...`: the same as the `minidit` command."""
from .cli import main

if __name__ == "__main__":
    main()
