"""Turn the API parameters a library error names into the running command's flags (and the
advice after an interrupt for commands that resume).

Library messages speak the Python API's language (``tissue_threshold``); an error lists those
names in ``WsiSslError.parameters``. Here the CLI finds, in the parser of the command that ran,
the flag whose destination is that parameter (or ``no_<parameter>`` for switches such as
``--no-resume``), spells the settings the message advises as those flags (``pass
overwrite=True`` -> ``pass --overwrite``) and names the rest as a hint: ``(command line:
--tissue-threshold)``.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from wsi_ssl.errors import WsiSslError

__all__ = ["RESUME_ADVICE", "command_parser", "in_command_words"]

RESUME_ADVICE = "re-run it (without --no-resume) to go on where it stopped"
"""What to do after an interrupt, for the commands that resume (tile, embed)."""

REDO_ADVICE = (
    "the slides not done keep what they had; re-run it with --no-resume on just those to redo "
    "them (--json lists them all, as not_done; a re-run without it keeps their earlier output)"
)
"""What to do after an interrupted ``--no-resume`` run of tile or embed."""


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


def in_command_words(err: BaseException, parser: argparse.ArgumentParser) -> str:
    """The error's message as the command's user would act on it: an API setting it
    advises (after pass, set, use, with, choose, or, and: ``pass overwrite=True``, ``set
    resume=False``, ``pass batch_size=8``) spelled as the command's flag (``--overwrite``,
    ``--no-resume``, ``--batch-size 8``), and ``(command line: --a)`` after it for the
    parameters it names otherwise (``lower tissue_threshold``, ``(batch_size=16)``), but a
    switch it advises turning off (``resume=False`` where the command has only ``--resume``)."""
    message = str(err)
    if not isinstance(err, WsiSslError):
        return message
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if any(o.startswith("--") for o in action.option_strings):
            actions.setdefault(action.dest, action)
    hinted: list[argparse.Action] = []
    for name in err.parameters:
        flag, negated = actions.get(name), actions.get(f"no_{name}")

        def spelled(match: re.Match[str], flag: Any = flag, negated: Any = negated) -> str:
            word, value = match.group(1), match.group(2).strip("'\"")
            if negated is not None and value == "False":
                return f"{word} {_long(negated)}"
            if flag is None or (value in ("True", "False")) != (flag.nargs == 0):
                return match.group(0)
            if isinstance(flag, argparse.BooleanOptionalAction):  # --compile / --no-compile
                return f"{word} {flag.option_strings[value == 'False']}"
            if flag.nargs == 0:
                return f"{word} {_long(flag)}" if value == str(bool(flag.const)) else match.group(0)
            return f"{word} {_long(flag)} {value}"

        value = r"('[^']*'|\"[^\"]*\"|[^\s,;)]*[^\s,;).])"
        message = re.sub(rf"\b({_ADVICE}) {name}={value}", spelled, message)
        chosen = flag if flag is not None else negated
        switched_off = rf"\b{name}=False\b"  # a switch the command can only turn on
        only_on = isinstance(chosen, argparse._StoreTrueAction) and re.search(switched_off, message)
        if chosen is not None and not only_on:
            hinted.append(chosen)
    hint = [
        _long(a)
        for a in dict.fromkeys(hinted)
        if not any(re.search(rf"{o}(?![\w-])", message) for o in a.option_strings)
    ]
    return f"{message} (command line: {', '.join(hint)})" if hint else message


_ADVICE = "pass|set|use|with|choose|or|and"
"""Words after which ``name=value`` is advice (else it says what was used: left as it is)."""


def _long(action: argparse.Action) -> str:
    return next(o for o in action.option_strings if o.startswith("--"))
