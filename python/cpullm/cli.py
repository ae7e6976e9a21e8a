"""The ``cpullm`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Sequence

from .errors import CpullmError


def _int_at_least(minimum: int):  # noqa: ANN202 - an argparse type
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _port(text: str) -> int:
    value = _int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number up to 65535, got {value}")
    return value


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from .dtypes import KV_CACHE_DTYPES
    from .hub import DEFAULT_MODEL

    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help="a model: a directory (converted or Hugging Face), a .gguf file, or a known name "
                             f"(default: {DEFAULT_MODEL}, fetched into the cache on first use)")
    parser.add_argument("--dtype", choices=["f32", "bf16", "int8"], default=None,
                        help="weight type (default: the stored one for converted models, f32 otherwise)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="compute threads (default: physical cores)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                        help="KV cache element type (default: f32 for f32 weights, else f16, which halves its "
                             "memory and speeds up long contexts)")
    parser.add_argument("--fast-prefill", action="store_true",
                        help="int8: one int8 digit for a prompt's activations instead of two (about 1.5x "
                             "faster prompt processing, somewhat less accurate; see docs/int8.md)")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults: the model's generation_config.json, else greedy)")
    group.add_argument("--temperature", type=float, default=None, help="0 is greedy; higher is more random")
    group.add_argument("--top-k", type=_non_negative_int, default=None, help="keep the K most likely tokens (0: off)")
    group.add_argument("--top-p", type=float, default=None,
                       help="keep the most likely tokens until their probability adds up to P (1: off)")
    group.add_argument("--min-p", type=float, default=None,
                       help="drop tokens less likely than P times the most likely one (0: off)")
    group.add_argument("--repetition-penalty", "--repeat-penalty", dest="repetition_penalty", type=float,
                       default=None, help="penalise tokens already in the context (1: off)")
    group.add_argument("--seed", type=_non_negative_int, default=None, help="random seed, for reproducible sampling")
    group.add_argument("--stop", action="append", default=None, metavar="TEXT",
                       help="stop when TEXT appears, not printing it (may be repeated)")


def _sampling_options(args: argparse.Namespace) -> dict[str, object]:
    """The sampling flags as keyword arguments, checked before the model is loaded."""
    from .sampling import SamplingParams
    from .streaming import normalize_stop

    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    options = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    SamplingParams(**options)  # ValueError with a clear message for a bad value
    stop = None if args.stop is None else [as_text(text) for text in args.stop]
    normalize_stop(stop)
    return {**options, "stop": stop}


def as_text(value: str) -> str:
    """Command-line text with undecodable bytes (which Python keeps in argv as lone surrogates) turned
    into U+FFFD, as standard input's are (see main)."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _cmd_generate(args: argparse.Namespace) -> int:
    from .loader import load

    options = _sampling_options(args)
    prompt = as_text(args.prompt) if args.prompt is not None else sys.stdin.read()
    model = load(args.model, dtype=args.dtype, threads=args.threads, kv_cache_dtype=args.kv_cache_dtype,
                 fast_prefill=args.fast_prefill)
    with model:
        for piece in model.stream(prompt, max_tokens=args.max_tokens, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from .chat_cli import run_chat

    return run_chat(args, {**_sampling_options(args), "max_tokens": args.max_tokens})


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    out = convert(args.source, args.output, dtype=args.dtype, group_size=args.group_size, force=args.force,
                  progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {out} ({args.dtype})", file=sys.stderr)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_result, run_bench

    result = run_bench(args.model, dtype=args.dtype, threads=args.threads, prompt_tokens=args.prompt_tokens,
                       gen_tokens=args.gen_tokens, repeats=args.repeats, kv_cache_dtype=args.kv_cache_dtype,
                       fast_prefill=args.fast_prefill)
    print(format_result(result, args.json))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from . import hub
    from .loader import load
    from .server import require_server_dependencies, serve

    require_server_dependencies()  # before the model is loaded: a missing extra is a one-line error
    model = load(args.model, dtype=args.dtype, threads=args.threads, context_length=args.context_length,
                 kv_cache_dtype=args.kv_cache_dtype, fast_prefill=args.fast_prefill)
    name = args.model_name or (hub.canonical_name(args.model) if hub.is_known(args.model) else None)
    if name is None:
        from pathlib import Path

        name = Path(args.model).name or str(args.model)
    with model:
        print(f"cpullm: serving {name} ({model.dtype}, context {model.spec.max_context}) at "
              f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        try:
            serve(model, model_name=name, host=args.host, port=args.port, api_key=args.api_key,
                  max_concurrent=args.max_concurrent, max_queued=args.max_queued, log_level=args.log_level,
                  cors_origins=args.allow_origin or ())
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it stopped on: the normal way to stop a server
            pass
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from . import hub

    if args.fetch is not None:
        hub.ensure_model(args.fetch or hub.DEFAULT_MODEL)
    rows = hub.list_models()
    print(f"cache: {hub.models_dir()}")
    for row in rows:
        status = "cached" if row["cached"] else "not downloaded"
        size = f"{row['bytes'] / 1e6:.0f} MB" if row["bytes"] is not None else "-"
        default = " (default)" if row["default"] else ""
        print(f"{row['name']}{default}  {status}  {size}  {row['path'] or row['description']}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (and a pointer to --help) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cpullm", description="Run Llama-family language models on the CPU.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"cpullm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = sub.add_parser("generate", help="continue a prompt",
                              description="Continue a prompt and print the text as it comes.")
    _add_model_options(generate)
    generate.add_argument("-p", "--prompt", default=None, help="the prompt text (default: read standard input)")
    generate.add_argument("-n", "--max-tokens", type=_non_negative_int, default=128,
                          help="most tokens to generate (default: 128)")
    _add_sampling_options(generate)
    generate.set_defaults(run=_cmd_generate)

    chat = sub.add_parser("chat", help="talk to a model in the terminal",
                          description="An interactive chat through the model's chat template; replies stream as they "
                                      "are generated. Ctrl-C stops a reply, Ctrl-D leaves; /help lists the commands.")
    _add_model_options(chat)
    chat.add_argument("--system", default=None, help="the system message (default: the chat template's own)")
    chat.add_argument("-n", "--max-tokens", type=_non_negative_int, default=None,
                      help="most tokens per reply (default: until the model ends its turn or the context is full)")
    chat.add_argument("--on-overflow", choices=["drop_oldest", "error"], default="drop_oldest",
                      help="when the conversation outgrows the context: forget the oldest turns (default) or "
                           "refuse the message")
    _add_sampling_options(chat)
    chat.set_defaults(run=_cmd_chat)

    convert = sub.add_parser("convert", help="convert a model into cpullm's fast format",
                             description="Convert a Hugging Face model directory or a GGUF file into cpullm's "
                                         "converted format (memory-mapped at load, weights in the chosen dtype; "
                                         "Q8_0 GGUF tensors go to int8 as they are stored).")
    convert.add_argument("source", help="a Hugging Face model directory or a .gguf file")
    convert.add_argument("output", help="the directory to write (must be empty or absent unless --force)")
    convert.add_argument("--dtype", choices=["int8", "bf16", "f32"], default="int8", help="weight type (default: int8)")
    convert.add_argument("--group-size", type=_positive_int, default=32,
                         help="inputs per int8 scale, a multiple of 32 (default: 32)")
    convert.add_argument("--force", action="store_true", help="replace an earlier conversion in OUTPUT")
    convert.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(run=_cmd_convert)

    bench = sub.add_parser("bench", help="measure load time, prefill and decode speed, memory",
                           description="Measure load time, prefill and decode tok/s, time to first token and peak "
                                       "RSS on a fixed synthetic prompt (medians over repeats).")
    _add_model_options(bench)
    bench.add_argument("--prompt-tokens", type=_positive_int, default=128, help="prompt length (default: 128)")
    bench.add_argument("--gen-tokens", type=_positive_int, default=64, help="tokens to decode (default: 64)")
    bench.add_argument("--repeats", type=_positive_int, default=3, help="runs to take the median of (default: 3)")
    bench.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    bench.set_defaults(run=_cmd_bench)

    serve = sub.add_parser("serve", help="serve the OpenAI API (chat and text completions) over HTTP",
                           description="Serve a model over HTTP with OpenAI's API: POST /v1/chat/completions and "
                                       "/v1/completions (streaming or not), GET /v1/models and /health. Needs the "
                                       "server extra: pip install 'cpullm[server]'.")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--api-key", default=os.environ.get("CPULLM_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' on /v1 requests (default: $CPULLM_API_KEY; "
                            "none: no key needed)")
    serve.add_argument("--model-name", default=None,
                       help="the model id clients see (default: the known name, or the path's last part)")
    serve.add_argument("--context-length", type=_positive_int, default=None,
                       help="most tokens a request may hold, prompt and reply (default: the model's)")
    serve.add_argument("--max-concurrent", type=_positive_int, default=4,
                       help="requests generated at once, round-robin, each with its own KV cache (default: 4); "
                            "the rest wait in a queue")
    serve.add_argument("--max-queued", type=_non_negative_int, default=256,
                       help="requests that may wait; beyond that the server answers 503 (default: 256)")
    serve.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                       help="let web pages from ORIGIN call the API from a browser (CORS; '*' for any; may be "
                            "repeated; default: none)")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
                       help="uvicorn's log level (default: info)")
    serve.set_defaults(run=_cmd_serve)

    models = sub.add_parser("models", help="list the known models and what is in the cache",
                            description="List the known models (the default one is fetched on first use) and the "
                                        "models in the cache ($CPULLM_HOME, else $XDG_CACHE_HOME/cpullm, else "
                                        "~/.cache/cpullm).")
    models.add_argument("--fetch", nargs="?", const="", default=None, metavar="NAME",
                        help="download and prepare a known model now (default: the default model)")
    models.set_defaults(run=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="replace")  # bytes that are not UTF-8 read as U+FFFD, not a crash mid-chat
    try:
        return args.run(args)
    except BrokenPipeError:  # the reader went away (`cpullm generate ... | head`): nothing left to say
        try:
            sys.stdout = open(os.devnull, "w")  # so that the interpreter's final flush stays quiet
        except OSError:
            pass
        return 0
    except (CpullmError, ValueError, OSError) as e:  # FileExistsError, FileNotFoundError among them
        print(f"cpullm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
