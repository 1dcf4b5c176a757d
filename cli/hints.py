"""Turn the API parameters a library error names into the running command's flags (and the
advice after an interrupt for commands that resume).

Library messages speak the Python API's language (``tissue_threshold``); an error lists those
names in ``WsiSslError.parameters``. Here the CLI finds, in the parser of the command that ran,
the flag whose destination is that parameter (or ``no_<parameter>`` for switches such as
``--no-resume``) and adds them as a hint: ``(command line: --tissue-threshold)``.
"""

from __future__ import annotations

import argparse

from wsi_ssl.errors import WsiSslError

__all__ = ["RESUME_ADVICE", "command_parser", "flag_hint"]

RESUME_ADVICE = "re-run it (without --no-resume) to go on where it stopped"
"""What to do after an interrupt, for the commands that resume (tile, embed)."""


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def command_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The innermost sub-command parser that parsed ``args`` (``wsi-ssl mil train`` -> train)."""
    while (sub := _subparsers(parser)) is not None:
        chosen = getattr(args, sub.dest, None)
        if chosen is None or chosen not in sub.choices:
            break
        parser = sub.choices[chosen]
    return parser


def flag_hint(err: BaseException, parser: argparse.ArgumentParser) -> str:
    """`` (command line: --a, --b)`` for the error's parameters the command has flags for."""
    if not isinstance(err, WsiSslError):
        return ""
    by_dest: dict[str, str] = {}
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if long:
            by_dest.setdefault(action.dest, long[0])
    flags = [
        by_dest[dest] for name in err.parameters for dest in (name, f"no_{name}") if dest in by_dest
    ]
    return f" (command line: {', '.join(dict.fromkeys(flags))})" if flags else ""
