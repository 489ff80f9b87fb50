"""Hydra's error texts as one line each: what its composition prints (condensed, with a quoting hint when an
override does not parse), a run dir it cannot create, argparse's refusal of a flag, and the usage errors Hydra
raises itself. cli.main() shows them; a traceback whose last frame is not Hydra's is a bug and stays one."""

from __future__ import annotations

import re
import traceback
from pathlib import Path
from typing import Optional

import hydra


def condense_hydra_error(text: str) -> str:
    """Hydra's multi-line composition errors as one line (the search path and hints dropped)."""
    text = text.split("Config search path:")[0]
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and "HYDRA_FULL_ERROR" not in ln and not ln.strip().startswith("object_type=")]
    return re.sub(r"\s+", " ", "; ".join(lines)).replace(":;", ":").replace(".;", ";")


def hydra_quoted(value: str) -> str:
    """value as a quoted string of Hydra's override grammar: in double quotes (single ones when the value holds a
    double quote), that quote and a backslash before it escaped, a trailing backslash doubled."""
    q = "'" if '"' in value and "'" not in value else '"'
    body = re.sub(r"(\\*)" + q, lambda m: m.group(1) * 2 + "\\" + q, value)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    return q + body + q


def shell_quoted(arg: str) -> str:
    """arg as one word for a POSIX shell (in single quotes)."""
    return "'" + arg.replace("'", "'\\''") + "'"


def unparsable_override(args: list) -> Optional[str]:
    """The first key=value argument that Hydra's override grammar refuses on its own (None: each one parses)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parser.parse_override(arg)
        except Exception:  # OverrideParseException, or the lexer's own error: either way, this one
            return arg
    return None


def quoting_hint(text: str, args: list) -> str:
    """For Hydra's "Error parsing override 'X'" or its lexer's refusal: when the refused argument is key=value,
    the value needs Hydra's quotes (letters outside ASCII, brackets, quotes...): say so with the user's own value
    quoted. When X has no '=' it is most likely the rest of a value that had a space in it and was not quoted;
    say how to quote it, with the user's own value when we can."""
    refused = unparsable_override(args)
    if refused is not None:
        key, value = refused.split("=", 1)
        if value[:1] in ("'", '"'):
            return ""  # already quoted: what is wrong is inside the quotes, and Hydra's message says it
        return (f"; {key}'s value must be quoted for Hydra's override grammar (unquoted it takes ASCII letters, "
                f"digits and a few symbols), e.g. {shell_quoted(f'{key}={hydra_quoted(value)}')}")
    m = re.search(r"Error parsing override '([^'\n]*)'", text)
    if not m or "=" in m.group(1):
        return ""
    token = m.group(1)
    example = """'data.root="/path/with space"'"""
    for i, arg in enumerate(args):  # the occurrence that follows a key=value: the value's first lost part
        if arg == token and i > 0 and "=" in args[i - 1] and not args[i - 1].startswith("-"):
            rest = []
            for more in args[i:]:  # every bare word after it was part of the value too
                if "=" in more or more.startswith("-"):
                    break
                rest.append(more)
            key, value = args[i - 1].split("=", 1)
            value = " ".join([value, *rest]).replace("'", "'\\''").replace('"', '\\"')
            example = f"""'{key}="{value}"'"""
            break
    return (f"; '{token}' is not key=value: a value with a space must be quoted for the shell and for Hydra, "
            f"e.g. {example}")


def os_error_line(text: str) -> str | None:
    """Hydra creates the run dir before cbam-train's code runs; when that fails it prints a traceback.
    Its last line ('PermissionError: [Errno 13] Permission denied: 'x'') becomes one line that says the fix."""
    m = re.search(r"^(?:\w+Error): \[Errno \d+\] ([^:\n]+): '([^'\n]+)'\s*$", text, re.M)
    if not m or "Traceback" not in text:
        return None
    return (f"cannot create the run dir: {m.group(2)} ({m.group(1)}); choose another with hydra.run.dir=PATH "
            "(or hydra.sweep.dir=PATH for -m)")


def usage_error(text: str) -> Optional[str]:
    """argparse's refusal of a flag (its usage text, then '<prog>: error: <why>') as one line, else None."""
    m = re.search(r"^\S+: error: (.+)$", text, re.M)
    if not m or "usage:" not in text:
        return None
    return f"{m.group(1)}; cbam-train --help lists the flags, --hydra-help Hydra's own"


def _in_hydra(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(Path(hydra.__file__).parent.resolve())


def raised_by_hydra(e: BaseException) -> bool:
    """Whether Hydra itself raised e (a usage error such as -m with --cfg), not code it called."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and _in_hydra(frames[-1].filename)


def hydra_traceback_line(text: str) -> Optional[str]:
    """A traceback Hydra printed for an error it raised itself (run_and_report: --shell-completion without a
    subcommand, ...): its message, else None. A traceback whose last frame is not Hydra's is a bug: kept."""
    files = re.findall(r'^\s*File "([^"]+)", line \d+', text, re.M)
    last = re.findall(r"^(?:\w+\.)*\w+(?:Error|Exception): (.+)$", text, re.M)
    if "Traceback (most recent call last)" not in text or not files or not last or not _in_hydra(files[-1]):
        return None
    return last[-1].strip()


def failure_line(text: str, args: list) -> Optional[str]:
    """What Hydra printed before exiting with an error, as one line for `error: ...`; None when it is not one of
    the errors above (then it is shown as it is)."""
    line = os_error_line(text) or usage_error(text) or submission_refused(text) or hydra_traceback_line(text)
    if line:
        return line
    if "HYDRA_FULL_ERROR" in text and "Traceback (most recent call last)" not in text:  # composition
        return f"config: {condense_hydra_error(text)}{quoting_hint(text, args)}"
    return None


# the launcher keys a refused SLURM submission most often comes from (slurm.yaml's defaults ask for a GPU)
SUBMISSION_KEYS = ("hydra.launcher.gpus_per_node", "hydra.launcher.partition", "hydra.launcher.mem_gb")


def submission_refused(text: str) -> Optional[str]:
    """One line for a job the cluster refused, from the traceback Hydra printed (or an exception's, formatted):
    submitit's FailedJobError from sbatch, as sbatch's own error and the keys to check; None for anything else."""
    marker = "submitit.core.utils.FailedJobError: "
    if marker not in text or "Command '['sbatch'" not in text:
        return None
    lines = [ln.strip() for ln in text[text.rindex(marker) + len(marker):].splitlines() if ln.strip()]
    said = next((ln for ln in lines if ln.startswith("sbatch: error")), lines[0] if lines else "no message")
    return (f"hydra/launcher=slurm: sbatch refused the job: {said}; check {', '.join(SUBMISSION_KEYS)} "
            "(hydra.launcher.gpus_per_node=0 on a cluster without GPUs)")
