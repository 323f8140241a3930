"""``degla-fast negatives``: hard-negative captions from a captions file, as DeGLA records.

Examples::

    degla-fast negatives --input captions_train2017.json --output train_negatives.json --method rule
    degla-fast negatives --input captions.csv --output negs.json --method llm \\
        --llm-url http://localhost:8000/v1 --llm-model meta-llama/Llama-3.1-8B-Instruct
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError, DataError
from . import NEGATIVE_TYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the sub-command's flags on ``parser``."""
    parser.add_argument("--input", required=True, help="COCO captions JSON, JSON list of {image, caption}, or CSV/TSV")
    parser.add_argument("--output", required=True, help="DeGLA JSON written here (atomically)")
    parser.add_argument("--method", choices=("rule", "llm"), default="rule", help="generator (default: rule)")
    parser.add_argument(
        "--types", nargs="+", default=list(NEGATIVE_TYPES), metavar="TYPE",
        help=f"negative types, in output order (default: all of {', '.join(NEGATIVE_TYPES)})",
    )
    parser.add_argument("--per-type", type=int, default=1, metavar="N", help="negatives per type and caption (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rule generator's choices")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    llm = parser.add_argument_group("llm method")
    llm.add_argument("--llm-url", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    llm.add_argument("--llm-model", help="model name the server expects")
    llm.add_argument("--llm-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    llm.add_argument("--prompts", default=None, help="folder of <type>.yaml prompts (default: configs/negatives)")
    llm.add_argument("--cache", default=None, help="JSONL cache for resuming (default: OUTPUT + .cache.jsonl)")
    llm.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    llm.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    llm.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx/timeouts (default 5)")
    llm.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each retry")
    llm.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    llm.add_argument("--max-tokens", type=int, default=256, help="reply length limit in tokens (default 256)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output even when this run produced fewer records")


def _check(args: argparse.Namespace) -> tuple[str, ...]:
    unknown = [t for t in args.types if t not in NEGATIVE_TYPES]
    if unknown:
        raise ConfigError(f"--types: unknown {', '.join(unknown)}; allowed: {', '.join(NEGATIVE_TYPES)}")
    if args.per_type < 1:
        raise ConfigError(f"--per-type must be >= 1, got {args.per_type}")
    if args.method == "llm":
        missing = [flag for flag, value in (("--llm-url", args.llm_url), ("--llm-model", args.llm_model)) if not value]
        if missing:
            raise ConfigError(f"--method llm needs {' and '.join(missing)}")
        from .llm import check_url

        check_url(args.llm_url)
        for flag, value in (("--timeout", args.timeout), ("--concurrency", args.concurrency)):
            if value <= 0:
                raise ConfigError(f"{flag} must be > 0, got {value}")
        if args.max_retries < 0 or args.backoff < 0:
            raise ConfigError("--max-retries and --backoff must be >= 0")
    return tuple(dict.fromkeys(args.types))


def _beside(path: Path, tag: str) -> Path:
    """``negs.json`` -> ``negs.TAG.json``: where a result goes that must not replace ``path``."""
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def _existing_records(path: Path) -> int | None:
    """How many DeGLA records ``path`` holds (None: no such file). A file that is not a list
    of records is a ConfigError: it is never replaced without --overwrite."""
    if not path.exists():
        return None
    if path.is_dir():
        raise DataError(f"cannot write {path}: is a folder (give a file name for --output)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        if isinstance(data, list) and all(isinstance(r, dict) and "enhanced" in r for r in data):
            return len(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    raise ConfigError(f"--output: {path} exists and is not a negatives file written by this command; "
                      "pass --overwrite to replace it")


def _write(path: Path, records: list) -> None:
    from ..io import cannot_write, write_json_atomic

    try:
        write_json_atomic(path, records)
    except OSError as err:
        raise cannot_write(path, err) from None


def run(args: argparse.Namespace) -> int:
    """Generate negatives for ``args.input`` and write ``args.output``; returns 0, or 1 when
    requests failed (the records made so far go beside the output, which is left as it was)."""
    from .io import build_records, read_captions

    types = _check(args)
    out = Path(args.output)
    if Path(args.input).exists() and out.exists() and out.resolve() == Path(args.input).resolve():
        raise ConfigError(f"--output: {out} is the --input file; choose another name")
    existing = None if args.overwrite else _existing_records(out)
    if args.overwrite and out.is_dir():
        raise DataError(f"cannot write {out}: is a folder (give a file name for --output)")
    captions = read_captions(args.input)
    progress = not args.no_progress
    cache_path = None
    if args.method == "rule":
        from .rules import generate_rule

        negatives, summary = generate_rule(captions, types, args.per_type, seed=args.seed, progress=progress)
    else:
        from .llm import DEFAULT_PROMPTS, ChatClient, generate_llm, load_prompts

        client = ChatClient(
            url=args.llm_url, model=args.llm_model, key_env=args.llm_key_env, timeout=args.timeout,
            max_retries=args.max_retries, backoff=args.backoff, temperature=args.temperature,
            max_tokens=args.max_tokens * args.per_type,
        )
        cache_path = args.cache or f"{args.output}.cache.jsonl"
        try:
            negatives, summary = generate_llm(
                captions, types, client=client, prompts=load_prompts(args.prompts or DEFAULT_PROMPTS, types),
                cache_path=cache_path, per_type=args.per_type, concurrency=args.concurrency, progress=progress,
            )
        except KeyboardInterrupt:
            print(f"interrupted: finished requests are kept in {cache_path}; rerun the same command to resume",
                  file=sys.stderr)
            return 130
    records = build_records(captions, negatives)
    print(summary.format(), file=sys.stderr)
    if summary.total_failed:
        # Incomplete: the output is left alone; what was made goes beside it.
        reasons = ", ".join(f"{k.removeprefix('failed: ')} x{v}" for k, v in summary.reasons.most_common()
                            if k.startswith("failed: "))
        partial = _beside(out, "partial")
        where = "no records written"
        if records:
            _write(partial, records)
            where = f"the {len(records)} records made so far are in {partial}"
        print(f"degla-fast: error: {summary.total_failed} of {summary.requests} LLM requests failed ({reasons}); "
              f"{where}; {out} was not written; finished requests are kept in {cache_path}: rerun the same "
              "command to retry the failed ones", file=sys.stderr)
        return 1
    if existing is not None and len(records) < existing:
        newer = _beside(out, "new")
        _write(newer, records)
        print(f"degla-fast: error: {out} holds {existing} records and this run made {len(records)}; it was "
              f"left as it was and the new records are in {newer} (pass --overwrite to replace it)", file=sys.stderr)
        return 1
    _write(out, records)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
