"""Turn the API parameters a library error names into the running command's flags (and the
advice after an interrupt for commands that resume).

Library messages speak the Python API's language (``tissue_threshold``); an error lists those
names in ``WsiSslError.parameters``. Here the CLI finds, in the parser of the command that ran,
the flag whose destination is that parameter (or ``no_<parameter>`` for switches such as
``--no-resume``), spells the settings the message advises as those flags (``pass
overwrite=True`` -> ``pass --overwrite``) and names the rest as a hint: ``(command line:
--tissue-threshold)``. Two tables cover what a destination cannot: the settings a message advises
re-tiling with are `wsi-ssl tile`'s flags whichever command ran (:data:`RETILE_FLAGS`), and a
mapping the API takes is a file on the command line (:data:`FILE_FLAGS`).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from wsi_ssl.errors import WsiSslError

__all__ = ["FILE_FLAGS", "RESUME_ADVICE", "RETILE_FLAGS", "command_parser", "in_command_words"]

RESUME_ADVICE = "re-run it (without --no-resume) to go on where it stopped"
"""What to do after an interrupt, for the commands that resume (tile, embed)."""

RETILE_FLAGS = {"tile_size": "--tile-size", "mpp": "--mpp"}
"""`wsi-ssl tile`'s flags for the settings a message advises re-tiling with (``re-tile with
tile_size=224 and mpp=0.5``), whichever command ran (tests/test_cli_hints.py checks them)."""

FILE_FLAGS = {"mpp_overrides": ("--mpp-csv", "FILE of slide,mpp rows")}
"""A mapping the API takes (``pass mpp_overrides={name: MPP} to tile_slides``) -> the flag that
reads it from a file where a command has one, and what that flag takes."""

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
    switch it advises turning off (``resume=False`` where the command has only ``--resume``).
    A flag spelled as the parameter stands in for one whose destination it is (pretrain's
    ``--weights``); a clause of an aside in parentheses advising only settings the command has
    no flag for is left out (its explanation kept); a re-tile's settings and a mapping are
    spelled by the module's two tables."""
    message = str(err)
    if not isinstance(err, WsiSslError):
        return message
    flagged = [a for a in parser._actions if any(o.startswith("--") for o in a.option_strings)]
    actions: dict[str, argparse.Action] = {}
    for action in flagged:
        actions.setdefault(action.dest, action)
    for action in flagged:  # else the flag spelled as the parameter (pretrain's --weights)
        actions.setdefault(_long(action)[2:].replace("-", "_"), action)
    for name, (option, _) in FILE_FLAGS.items():  # a mapping the command reads from a file
        for action in flagged:
            if option in action.option_strings:
                actions.setdefault(name, action)
    message = _without_asides_for_others(message, err.parameters, actions)
    message = _retile_in_tile_flags(_mappings_as_files(message, err.parameters, actions))
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

        message = re.sub(rf"\b({_ADVICE}) {name}={_VALUE}", spelled, message)
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

_VALUE = r"('[^']*'|\"[^\"]*\"|[^\s,;)]*[^\s,;).])"
"""An advised value: quoted, or up to a space, comma, semicolon or closing bracket (not a
sentence's full stop)."""


def _mappings_as_files(
    message: str, parameters: tuple[str, ...], actions: dict[str, argparse.Action]
) -> str:
    """``message`` advising a mapping (``pass mpp_overrides={name: MPP} to tile_slides``) as
    the flag of the command that reads it from a file (``pass --mpp-csv FILE of slide,mpp
    rows``); see :data:`FILE_FLAGS`."""
    for name in (p for p in parameters if p in FILE_FLAGS and p in actions):

        def as_flag(match: re.Match[str], said: str = " ".join(FILE_FLAGS[name])) -> str:
            return f"{match.group(1)} {said}"

        mapping = rf"\b({_ADVICE}) {name}=\{{[^}}]*\}}(?: to \w+)?"
        message = re.sub(mapping, as_flag, message)
    return message


def _retile_in_tile_flags(message: str) -> str:
    """``message`` with the settings its ``re-tile ...`` clauses advise spelled as `wsi-ssl
    tile`'s flags (``re-tile with --tile-size 224 and --mpp 0.5``); see :data:`RETILE_FLAGS`."""
    names = "|".join(RETILE_FLAGS)

    def flags(match: re.Match[str]) -> str:
        word, name, value = match.group(1), match.group(2), match.group(3).strip("'\"")
        return f"{word} {RETILE_FLAGS[name]} {value}"

    def clause(match: re.Match[str]) -> str:
        return re.sub(rf"\b(with|and|at) ({names})={_VALUE}", flags, match.group(0))

    return re.sub(r"\bre-tile\b.*?(?= or |, |[;(]|$)", clause, message)


def _without_asides_for_others(
    message: str, parameters: tuple[str, ...], actions: dict[str, argparse.Action]
) -> str:
    """``message`` less the clauses of its asides in parentheses that advise only settings of
    other commands (``; choose resize='bilinear' with check_mpp=False ...`` to `wsi-ssl
    index`), the explanation beside them kept; an aside that held nothing else goes whole
    (``(pretraining reads them all ..., with mixed_scales=True)`` to `wsi-ssl embed`), and
    with it the alternative it is the only how-to of (``, or give each slide's scale (pass
    mpp_overrides=...)`` to `wsi-ssl demo`)."""
    advice = rf"\b(?:{_ADVICE}) (\w+)="

    def ours(clause: str) -> bool:
        advised = set(re.findall(advice, clause)) & set(parameters)
        return not advised or any(p in actions or f"no_{p}" in actions for p in advised)

    def kept(match: re.Match[str]) -> str:
        clauses = match.group("aside")[2:-1].split("; ")
        left = [c for c in clauses if ours(c)]
        if len(left) == len(clauses):
            return match.group(0)
        if left:  # the explanation stays, the advice for other commands goes
            return f"{match.group('lead') or ''} ({'; '.join(left)})"
        lead = match.group("lead") or ""
        return lead if re.search(advice, lead) else ""  # an alternative advising nothing else

    return re.sub(r"(?P<lead>, or [^,;()]*)?(?P<aside> \([^()]*\))", kept, message)


def _long(action: argparse.Action) -> str:
    return next(o for o in action.option_strings if o.startswith("--"))
