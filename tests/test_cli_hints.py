"""Library messages name API parameters; the CLI adds the flags of the command that ran."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ssl.cli.hints import command_parser, in_command_words
from wsi_ssl.cli.main import build_parser, main
from wsi_ssl.errors import ConfigError, EmbeddingsWouldBeReplacedError, NoTissueError
from wsi_ssl.outcome import BatchOutcome, SlideOutcome


def test_config_error_from_the_cli_names_the_flag(tmp_path, capsys) -> None:
    code = main(["tile", str(tmp_path / "x.svs"), "--out", str(tmp_path), "--tile-size", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["wsi-ssl: error: tile_size must be >= 16, got 8 (command line: --tile-size)"]


def test_python_callers_see_parameters_not_flags() -> None:
    from wsi_ssl.config import TilingConfig

    with pytest.raises(ConfigError) as info:
        TilingConfig(tile_size=9000)
    assert "--" not in str(info.value)
    assert info.value.parameters == ("tile_size", "max_tile_size")


def test_switches_and_nested_commands_are_found() -> None:
    parser = build_parser()
    embed = command_parser(parser, parser.parse_args(["embed", "ROOT", "--encoder", "x"]))
    assert embed.prog.endswith("embed")
    replaced = EmbeddingsWouldBeReplacedError("/a/b.zarr", "enc", "other", "wanted")
    assert "pass resume=False" in str(replaced)  # the API's words; the command's:
    worded = in_command_words(replaced, embed)
    assert worded == str(replaced).replace("resume=False", "--no-resume")
    train = command_parser(
        parser, parser.parse_args(["mil", "train", "ROOT", "--labels", "l.csv", "--out", "o"])
    )
    assert train.prog.endswith("mil train")
    # a parameter the command has no flag for adds nothing
    no_tissue = NoTissueError("/s.svs", 0.1)
    assert in_command_words(no_tissue, train) == str(no_tissue)
    assert in_command_words(ValueError("plain"), embed) == "plain"


@pytest.mark.parametrize(
    ("argv", "message", "parameters", "worded"),
    [
        (  # a switch, and a value flag named but not set: hinted
            ["mil", "train", "R", "--labels", "l", "--out", "o"],
            "o: not empty; pass overwrite=True or another out; lower lr",
            ("overwrite", "lr"),
            "o: not empty; pass --overwrite or another out; lower lr (command line: --lr)",
        ),
        (  # values, quoted or not, and the sentence's full stop
            ["embed", "R", "--encoder", "x"],
            "pass batch_size=8 or smaller, or precision='bf16'.",
            ("batch_size", "precision"),
            "pass --batch-size 8 or smaller, or --precision bf16.",
        ),
        (  # a store_false switch, and a no_<parameter> switch
            ["embed", "R", "--encoder", "x"],
            "set check_mpp=False, or pass resume=False",
            ("check_mpp", "resume"),
            "set --no-mpp-check, or pass --no-resume",
        ),
        (  # --x/--no-x; a switch the command can only turn on: no flag named for it
            ["pretrain", "R", "--out", "o"],
            "set compile=False to turn it off; pass resume=False",
            ("compile", "resume"),
            "set --no-compile to turn it off; pass resume=False",
        ),
        (  # what was used, not advice: left in the API's words, the flag named after it
            ["tile", "S", "--out", "o"],
            "more than max_tiles=100 tiles (tile_size=16); raise max_tiles",
            ("max_tiles", "tile_size"),
            "more than max_tiles=100 tiles (tile_size=16); raise max_tiles "
            "(command line: --max-tiles, --tile-size)",
        ),
    ],
)
def test_settings_a_message_advises_are_spelled_as_flags(
    argv: list[str], message: str, parameters: tuple[str, ...], worded: str
) -> None:
    parser = build_parser()
    command = command_parser(parser, parser.parse_args(argv))
    assert in_command_words(ConfigError(message, parameters=parameters), command) == worded


def test_a_flag_spelled_as_the_parameter_stands_in_for_it() -> None:
    """pretrain's ``--weights`` (destination ``init_weights``) is what a missing weights file
    of ``--init`` asks for: ``pass --weights PATH``, not the API's ``weights=PATH``."""
    from wsi_ssl.errors import WeightsNotFoundError

    parser = build_parser()
    pretrain = command_parser(parser, parser.parse_args(["pretrain", "R", "--out", "o"]))
    missing = WeightsNotFoundError("vit_small_patch16_224", "/w/vit_small_patch16_224.pth")
    assert "or pass weights=PATH;" in str(missing)
    assert in_command_words(missing, pretrain) == str(missing).replace(
        "pass weights=PATH", "pass --weights PATH"
    )
    # a flag whose destination is the parameter still comes first (embed's own --weights)
    embed = command_parser(parser, parser.parse_args(["embed", "R", "--encoder", "x"]))
    assert "or pass --weights PATH;" in in_command_words(missing, embed)


def test_an_aside_advising_another_commands_setting_is_left_out() -> None:
    """A multi-scale tiling's folder given as one archive: pretrain is told to name each
    scale with --mixed-scales; a command without that flag is told only to name one."""
    from pathlib import Path

    from wsi_ssl.errors import MultiScaleRootError

    parser = build_parser()
    err = MultiScaleRootError("/a/ms", [Path("/a/ms/mpp-0.5"), Path("/a/ms/mpp-1")])
    first = (
        "/a/ms: not an archive root but one per scale, written by a multi-scale tile "
        "(/a/ms/mpp-0.5, /a/ms/mpp-1); name one of them"
    )
    assert str(err) == f"{first} (pretraining reads them all when each is named, with " + (
        "mixed_scales=True)"
    )
    for argv in (["embed", "R", "--encoder", "x"], ["export", "R", "--out", "o"], ["index", "R"]):
        assert in_command_words(err, command_parser(parser, parser.parse_args(argv))) == first
    for argv in (
        ["pretrain", "R", "--out", "o"],
        ["pretrain", "R", "--out", "o", "--mixed-scales"],
    ):
        pretrain = command_parser(parser, parser.parse_args(argv))
        worded = in_command_words(err, pretrain)
        assert worded == str(err).replace("mixed_scales=True", "--mixed-scales")
    # an aside advising a setting the command has is kept (and spelled as its flag)
    embed = command_parser(parser, parser.parse_args(["embed", "R", "--encoder", "x"]))
    kept = ConfigError("x: failed (pass resume=False to redo it)", parameters=("resume",))
    assert in_command_words(kept, embed) == "x: failed (pass --no-resume to redo it)"


def test_an_asides_explanation_stays_when_its_advice_is_another_commands() -> None:
    """A scaled input-size mismatch told index, tile, pretrain and demo to re-tile at --mpp
    without the reason (the aside, its explanation and its advice for embed, went whole);
    only the clause advising settings they lack goes."""
    from wsi_ssl.errors import InputSizeMismatchError

    parser = build_parser()
    err = InputSizeMismatchError("s.zarr", 256, 224, "enc", scale=(0.571, 0.5))
    first = (
        "s.zarr: tiles are 256 px but encoder 'enc' takes 224 px and its config says "
        "resize='never'; re-tile with --tile-size 224 and --mpp 0.5 (resized, these tiles "
        "would reach it at 0.571 µm/px, not the 0.5 µm/px it was trained at"
    )
    others = (["index", "R"], ["tile", "S", "--out", "o"], ["pretrain", "R", "--out", "o"])
    for argv in (*others, ["demo"]):
        worded = in_command_words(err, command_parser(parser, parser.parse_args(argv)))
        assert worded == f"{first})", argv
    embed = command_parser(parser, parser.parse_args(["embed", "R", "--encoder", "x"]))
    assert in_command_words(err, embed) == (
        f"{first}; choose --resize bilinear with --no-mpp-check to embed them so anyway)"
    )


def test_outcome_lines_carry_the_hint() -> None:
    batch = BatchOutcome(
        outcomes=[
            SlideOutcome("a", "complete", n_tiles=5, seconds=1.0),
            SlideOutcome.failure("b", NoTissueError("/b.svs", 0.1)),
        ]
    )
    lines = batch.lines(lambda e: f"{e} [hint]")
    assert lines[0].split() == ["complete", "5", "tiles", "1.0s", "a"]
    assert lines[1].endswith(
        "lower tissue_threshold (tissue pieces under the detector's "
        "minimum area are ignored as debris) [hint]"
    )
    assert batch.counts == {"complete": 1, "skipped": 0, "busy": 0, "failed": 1}
    assert batch.tiles_done == 5 and batch.exit_code == 1
    assert batch.outcomes[1].to_dict()["error_type"] == "NoTissueError"
    assert isinstance(batch.outcomes[1].exception, NoTissueError)


def test_unknown_registry_names_carry_their_config_field() -> None:
    from wsi_ssl.mil.models.registry import MODELS
    from wsi_ssl.ssl.backbones import BACKBONES
    from wsi_ssl.ssl.methods import RECIPES

    for registry, field in ((RECIPES, "method"), (BACKBONES, "arch"), (MODELS, "model")):
        with pytest.raises(ConfigError) as info:
            registry.get("no-such-name")
        assert info.value.parameters == (field,)
        assert "not registered; valid: " in str(info.value)


def test_a_bad_stain_reference_names_its_flag(tmp_path) -> None:
    from wsi_ssl.errors import StainNormalizationError
    from wsi_ssl.stain import StainNormalizer

    parser = build_parser()
    embed = command_parser(parser, parser.parse_args(["embed", "ROOT", "--encoder", "x"]))
    (tmp_path / "ref.png").write_text("not an image")
    white = np.full((64, 64, 3), 255, dtype=np.uint8)
    for reference in (tmp_path / "ref.png", white):  # unreadable, and blank (no stains)
        with pytest.raises(StainNormalizationError) as info:
            StainNormalizer("macenko", reference)
        assert info.value.parameters == ("stain_reference",)
        assert in_command_words(info.value, embed).endswith(" (command line: --stain-reference)")


def test_a_reader_that_stops_early_ends_the_command_quietly() -> None:
    """``wsi-ssl encoders | head -0``: the reader closes the pipe before the command writes
    (it is still importing), so its first write fails: the command ends with 141 (128 +
    SIGPIPE, as the shell's tools do) and nothing on stderr, not an 'unexpected' error."""
    import subprocess
    import sys

    code = "import sys; from wsi_ssl.cli.main import main; sys.exit(main(['encoders']))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader goes away at once
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""


def _said_default(text: str) -> str | None:
    """The value a help text gives as "(default X)", or None."""
    import re

    found = re.search(r"default ([-+\w.]+)", text or "")
    return found.group(1) if found else None


def _same(said: str, value: object) -> bool:
    try:
        return float(said) == float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return said == str(value)


@pytest.mark.parametrize(
    "command", [["tile"], ["embed"], ["pretrain"], ["mil", "train"], ["evaluate"]]
)
def test_the_cli_defaults_are_the_configs_defaults(command: list[str]) -> None:
    """A flag's argparse default and the "(default X)" of its help are its config field's
    default (the CLI never keeps a second, diverging copy)."""
    import argparse
    import dataclasses

    from wsi_ssl.config import TilingConfig
    from wsi_ssl.embedding import EmbedConfig
    from wsi_ssl.evaluation import EvaluationConfig
    from wsi_ssl.mil import MILConfig
    from wsi_ssl.ssl import PretrainConfig

    config = {
        "tile": TilingConfig,
        "embed": EmbedConfig,
        "pretrain": PretrainConfig,
        "mil": MILConfig,
        "evaluate": EvaluationConfig,
    }[command[0]]()
    parser = build_parser()
    for name in command:
        [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    renamed = {"bootstrap": "n_bootstrap"}  # evaluate --bootstrap N
    fields = {f.name for f in dataclasses.fields(config)}
    checked = 0
    for action in parser._actions:
        field = renamed.get(action.dest, action.dest)
        if field not in fields or getattr(config, field) is None:
            continue
        want = getattr(config, field)
        if action.default not in (None, argparse.SUPPRESS) and not isinstance(want, bool):
            assert action.default == want, (command, action.dest)
            checked += 1
        said = _said_default(action.help or "")
        if said is not None:
            assert _same(said, want), (command, action.dest, said, want)
            checked += 1
    assert checked >= 1


def test_an_unknown_option_shows_its_sub_command_usage(capsys: pytest.CaptureFixture[str]) -> None:
    """`wsi-ssl mil train ... --quiet`: the train command's usage and error (it printed the
    top level's `usage: wsi-ssl [-h] [--version] COMMAND ...`)."""
    from wsi_ssl.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["mil", "train", "ROOT", "--labels", "x.csv", "--out", "r", "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("usage: wsi-ssl mil train ")
    assert err.rstrip().endswith("wsi-ssl mil train: error: unrecognized arguments: --quiet")


def test_the_tables_name_tiles_own_flags() -> None:
    """What hints.RETILE_FLAGS and FILE_FLAGS spell are `wsi-ssl tile`'s flags, for the
    settings they stand for."""
    from wsi_ssl.cli.hints import FILE_FLAGS, RETILE_FLAGS

    parser = build_parser()
    tile = command_parser(parser, parser.parse_args(["tile", "S", "--out", "o"]))
    dests = {o: a.dest for a in tile._actions for o in a.option_strings}
    assert {name: dests[flag] for name, flag in RETILE_FLAGS.items()} == {
        "tile_size": "tile_size",
        "mpp": "mpp",
    }
    assert {name: dests[flag] for name, (flag, _) in FILE_FLAGS.items()} == {
        "mpp_overrides": "mpp_csv"
    }


def test_a_retile_is_spelled_with_tiles_flags_whichever_command_ran() -> None:
    """A re-tile's settings are `wsi-ssl tile`'s flags from any command (embed has no
    --tile-size, index no flag at all), whatever parameters the error lists; the rest of the
    message is still the running command's."""
    parser = build_parser()
    message = "s.zarr: re-tile with tile_size=224 and mpp=0.25, or pass check_mpp=False"
    for argv, rest in (
        (["embed", "R", "--encoder", "x"], "--no-mpp-check"),
        (["index", "R"], "check_mpp=False"),
    ):
        command = command_parser(parser, parser.parse_args(argv))
        for parameters in (("check_mpp",), ("tile_size", "mpp", "check_mpp")):
            worded = in_command_words(ConfigError(message, parameters=parameters), command)
            assert worded == f"s.zarr: re-tile with --tile-size 224 and --mpp 0.25, or pass {rest}"
    pretrain = command_parser(parser, parser.parse_args(["pretrain", "R", "--out", "o"]))
    both = ConfigError(
        "re-tile with tile_size=256 or train with tile_size=224", parameters=("tile_size",)
    )
    worded = in_command_words(both, pretrain)
    assert worded == "re-tile with --tile-size 256 or train with --tile-size 224"
