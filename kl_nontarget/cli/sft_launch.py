"""`kl-nontarget sft` through `accelerate launch`, as `trl sft` runs: options that no dataclass of the command knows
but `accelerate launch` takes (`--num_processes 8`, `--mixed_precision bf16`, `--config_file FILE`, TRL's
`--accelerate_config zero3`), on the command line or as keys of the config file, start the command again under
`accelerate launch -m kl_nontarget.cli sft ...`. The relaunched processes see `LAUNCHED` in their environment and
ignore those options. Anything else unknown is an `InputError`.
"""

from __future__ import annotations

import difflib
import os
import subprocess

from kl_nontarget.cli.sft_data import InputError

LAUNCHED = "KL_NONTARGET_SFT_LAUNCHED"
_SCRIPT = "kl_nontarget.cli"  # run with --module
_SENTINEL = "<script>"


class _LaunchUsageError(Exception):
    pass


def _raise(message):
    raise _LaunchUsageError(message)


def _launch_parser():
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    parser.error = _raise  # one message instead of accelerate's usage dump and exit
    return parser


def _accepts(parser, strings: list[str]) -> tuple[bool, list[str]]:
    """Whether `accelerate launch` takes all of `strings` as its own options, and the ones it does not know."""
    try:
        namespace, extras = parser.parse_known_args([*strings, _SENTINEL])
    except _LaunchUsageError as err:
        raise InputError(f"accelerate launch option: {err}") from None
    stray = [] if namespace.training_script == _SENTINEL else [namespace.training_script]
    return not extras and not stray, extras + stray


def _resolve_trl_config(strings: list[str]) -> list[str]:
    """TRL's `--accelerate_config NAME` (a file or one of TRL's shipped configs) as `--config_file PATH`."""
    if "--accelerate_config" not in strings:
        return strings
    try:
        from trl.cli.accelerate_config import resolve_accelerate_config_argument
    except ImportError:  # pragma: no cover - an older TRL without it
        raise InputError("--accelerate_config needs TRL's command-line package (trl.cli)") from None
    try:
        return resolve_accelerate_config_argument(list(strings))
    except ValueError as err:
        raise InputError(str(err)) from None


def launch_arguments(config_rest: list[str], cli_rest: list[str], config_path: str | None,
                     known: list[str]) -> list[str]:
    """The `accelerate launch` arguments among what the dataclasses left over; InputError for anything else.

    `config_rest` is ["--key", "value", ...] from the config file, `cli_rest` the leftover command line, `known` the
    options the command has (for "did you mean").
    """
    if not config_rest and not cli_rest:
        return []
    parser = _launch_parser()
    config_rest = _resolve_trl_config(config_rest)
    cli_rest = _resolve_trl_config(cli_rest)
    from_config, bad_keys = [], []
    for i in range(0, len(config_rest) - 1, 2):
        key, value = config_rest[i:i + 2]
        if _accepts(parser, [key, value])[0]:
            from_config += [key, value]
        elif value in ("True", "False") and _accepts(parser, [key])[0]:  # a YAML boolean for a switch (cpu: true)
            from_config += [key] if value == "True" else []
        else:
            bad_keys.append(key[2:])
    if bad_keys:
        raise InputError(f"unknown option(s) in {config_path}: {', '.join(bad_keys)}{_did_you_mean(bad_keys, known)}")
    ok, unknown = _accepts(parser, cli_rest)
    if not ok:
        flags = [s for s in unknown if s.startswith("-")]
        if not flags:
            raise InputError(f"unexpected value(s): {' '.join(unknown)}")
        names = [f.lstrip("-").split("=", 1)[0].replace("-", "_") for f in flags]
        raise InputError(f"unknown option(s): {', '.join(flags)}{_did_you_mean(names, known)}")
    return from_config + cli_rest


def _did_you_mean(names: list[str], known: list[str]) -> str:
    guesses = [match for name in names for match in difflib.get_close_matches(name, known, n=1)]
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


def already_launched() -> bool:
    return os.environ.get(LAUNCHED) == "1"


def _without(argv: list[str], removed: list[str]) -> list[str]:
    """`argv` without `removed`, an ordered subsequence of it."""
    pending = iter(removed)
    current = next(pending, None)
    kept = []
    for item in argv:
        if current is not None and item == current:
            current = next(pending, None)
        else:
            kept.append(item)
    return kept


def relaunch(argv: list[str], launch_args: list[str], cli_rest: list[str]) -> int:
    """Run `kl-nontarget sft argv` again under `accelerate launch launch_args`; the exit code of the run."""
    from accelerate.commands.launch import launch_command

    script_args = _without(argv, cli_rest)  # the accelerate options given on the command line go to accelerate
    try:
        args = _launch_parser().parse_args([*launch_args, "--module", _SCRIPT, "sft", *script_args])
    except _LaunchUsageError as err:
        raise InputError(f"accelerate launch option: {err}") from None
    previous = os.environ.get(LAUNCHED)
    os.environ[LAUNCHED] = "1"
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # one process: its own exit code (2 for bad input)
        return err.returncode
    except Exception as err:  # several processes: torch's elastic launcher reports the failed ranks
        print(f"kl-nontarget sft: the launched run failed: {err}")
        return 1
    finally:
        if previous is None:
            os.environ.pop(LAUNCHED, None)
        else:
            os.environ[LAUNCHED] = previous
    return 0
