"""The `minidit` command line, its own wing on top of the library (the library never imports it).

    minidit generate --prompt "a photo of a cat" [--weights PATH] [--height H --width W] [--steps N]
                     [--guidance G] [--seed S|-1] [--num-images N] [--output outputs/] [--threads N] ...
    minidit img2img | personalize | inpaint | outpaint | freecus ...   (see `minidit COMMAND --help`)
    minidit info PATH

args.py: the options; commands.py: what each subcommand does; record.py: the PNG record and `--from-png`;
info.py: `minidit info`.

Why one import sits inside `main`: `--help` and a usage error must answer at once, and importing torch takes
seconds (6-11 s on a loaded machine; bench/cli_start.py). So this module and args.py import nothing that imports
torch (args.py reads its defaults from the torch-free minidit.defaults; minidit/__init__.py resolves its
re-exports lazily, PEP 562), and `main` imports commands.py, which needs torch, only after the arguments parsed.
`minidit eval` hands its options to minidit/eval/command.py the same way. tests/test_structure.py lists these
lazy first-party imports in LAZY_OK; tests/test_cli_checks.py checks that
`minidit --help` imports no torch.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
import warnings

from .args import build_parser, negative_values

# A user mistake is one line naming the option/file, exit code 1; --debug shows the traceback instead.
# RuntimeError: torch's (out of memory, a CUDA failure) and the standard library's (`~nouser/x`: no such home);
# ArithmeticError: an OverflowError from a huge number. CheckpointError, PIL's and JSON errors are ValueErrors.
USER_ERRORS = (ValueError, TypeError, OSError, MemoryError, RuntimeError, ArithmeticError)


def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: temporary files are removed, no output is half-written


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if [a for a in argv if a != "--debug"][:1] == ["eval"]:  # the harness parses its own options
        from ..eval.command import main as evaluate  # lazily, like commands.py: it needs torch
        return evaluate([a for a in argv if a != "--debug"][1:], prog="minidit eval")
    parser = build_parser()
    if "--from-png" in argv or any(a.startswith("--from-png=") for a in argv):  # --image, --ref, ...: recorded
        for p in parser.subcommands.values():
            for a in p.options:
                a.required = False
    args = parser.parse_args(negative_values([a for a in argv if a != "--debug"], parser))
    old = signal.signal(signal.SIGTERM, interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        args.t0 = time.perf_counter()
        with warnings.catch_warnings():  # a library warning is one clean line, not a source listing
            warnings.simplefilter("default")
            warnings.showwarning = lambda message, category, *a, **k: print(f"warning: {message}", file=sys.stderr)
            from .commands import execute  # after parsing: --help and usage errors never wait for torch (above)
            execute(args, parser)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as e:
        if debug:
            raise
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        if isinstance(e, (RuntimeError, ArithmeticError)):
            text += f" ({type(e).__name__}; --debug shows where)"
        raise SystemExit("error: " + text) from None
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
