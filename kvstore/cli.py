"""The ``kvstore`` command: serve, stats, bench, demo.

Configuration is resolved here and only here (file < environment < flags) and
handed down as one frozen StoreConfig; nothing below reads the environment.
Heavy imports (grpc server, Ray, torch) happen inside the subcommand that needs
them, so ``kvstore --help`` is instant. Subcommands implemented outside this
package (``stats``, a client of the server, in transfer/cli.py; ``demo``, on the
workers' side, with Ray and torch) are named in one table, :data:`EXTERNAL_COMMANDS`,
and loaded by module path only when chosen: no module of kvstore/ imports the
client, and importing this one, or running ``kvstore serve``, never loads the
client, workers, Ray or torch (tests/unit/test_layering.py checks both).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.config import parse_bytes

_SERVE_EPILOG = """\
examples:
  kvstore serve                                  RAM (2 GiB) + disk under ~/.cache/kvstore/disk on 127.0.0.1:50051
  kvstore serve --port 6000 --memory-bytes 8GiB  a bigger RAM tier on another port
  kvstore serve --no-disk                        RAM only: nothing survives a restart
  kvstore serve --config kvstore.yaml            everything from a YAML/TOML file (see docs/operations.md)
  kvstore serve --redis-url redis://cache:6379/0 --s3-endpoint http://minio:9000 --s3-bucket kv
                                                 add Redis and S3 tiers (written through)
  KVSTORE_SERVER__PORT=6000 kvstore serve        any config field as KVSTORE_<SECTION>__<FIELD>

precedence: built-in defaults < --config file < KVSTORE_* environment variables < flags.
byte sizes accept 1048576, 64MiB, 2GiB, 500MB. Stop with Ctrl-C or SIGTERM: in-flight RPCs
are drained for --grace seconds.
"""

_BENCH_EPILOG = """\
examples:
  kvstore bench store_throughput --quick         gRPC Put/Get GB/s vs raw loopback TCP, in under a minute
  kvstore bench store_throughput --tiers memory,disk,redis,s3
  kvstore bench NAME --help                      the options of one benchmark

NAME is a file bench/NAME.py of the kvstore repository; every benchmark prints JSON
followed by a one-line summary.
"""

_DEMO_EPILOG = """\
examples:
  kvstore demo                                   prefill on one Ray worker, decode on another, KV moved via kvstore
  kvstore demo --help                            the demo's own options
"""


def _bytes_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore",
        description="Store and move LLM KV-cache blocks: a tiered (RAM, disk, Redis, S3), checksummed "
        "gRPC store.",
        epilog="Run 'kvstore <command> --help' for the options and examples of each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    fmt = argparse.RawDescriptionHelpFormatter
    serve = sub.add_parser(
        "serve",
        help="run the store server",
        formatter_class=fmt,
        epilog=_SERVE_EPILOG,
        description="Run the kvstore gRPC server until Ctrl-C or SIGTERM.",
    )
    serve.add_argument("--config", metavar="FILE", help="YAML (.yaml/.yml) or TOML (.toml) config file")
    g = serve.add_argument_group("server")
    g.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, help="port to listen on (default 50051; 0 picks a free one)")
    g.add_argument("--workers", type=int, help="threads for blocking store work, tier I/O (default 16)")
    g.add_argument(
        "--max-blob-bytes", type=_bytes_arg, metavar="SIZE", help="largest blob Put accepts (64MiB)"
    )
    g.add_argument(
        "--max-message-bytes",
        type=_bytes_arg,
        metavar="SIZE",
        help="largest gRPC message either way (72MiB); must exceed --max-blob-bytes",
    )
    g = serve.add_argument_group("tiers")
    g.add_argument("--memory-bytes", type=_bytes_arg, metavar="SIZE", help="RAM tier budget (default 2GiB)")
    g.add_argument(
        "--memory-prefault",
        action="store_true",
        help="map the RAM tier's whole budget at start-up (faster Puts; RSS starts at the budget)",
    )
    g.add_argument("--disk-path", metavar="DIR", help="disk tier directory (default ~/.cache/kvstore/disk)")
    g.add_argument("--disk-bytes", type=_bytes_arg, metavar="SIZE", help="disk tier budget (default 64GiB)")
    g.add_argument("--no-disk", action="store_true", help="run without the disk tier (RAM only)")
    g.add_argument("--fsync", choices=["batch", "always", "never"], help="disk durability (default batch)")
    g.add_argument("--redis-url", metavar="URL", help="enable the Redis tier at this URL")
    g.add_argument("--s3-endpoint", metavar="URL", help="enable the S3 tier at this endpoint URL")
    g.add_argument("--s3-bucket", metavar="NAME", help="S3 bucket (default kvstore)")
    g = serve.add_argument_group("operations")
    g.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: off)")
    g.add_argument("--grace", type=float, default=10.0, help="seconds to drain RPCs on shutdown (10)")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    g.add_argument(
        "--ready-file",
        metavar="FILE",
        help='once listening, write {"port": ..., "pid": ...} as JSON here (for scripts/tests)',
    )
    g.add_argument("--print-config", action="store_true", help="print the effective config as JSON and exit")
    serve.set_defaults(func=cmd_serve)

    stats = sub.add_parser(
        "stats",
        help="show a running server's tiers and counters",
        add_help=False,
        description="Run transfer.cli's stats command with the given arguments (see 'kvstore stats --help').",
    )
    stats.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the stats command")
    stats.set_defaults(func=cmd_stats)

    bench = sub.add_parser(
        "bench",
        help="run a benchmark from bench/",
        formatter_class=fmt,
        epilog=_BENCH_EPILOG,
        description="Run bench/NAME.py with the given arguments.",
    )
    bench.add_argument("name", metavar="NAME", nargs="?", help="benchmark name, e.g. store_throughput")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser(
        "demo",
        help="run the prefill/decode demo over Ray and the real model",
        formatter_class=fmt,
        epilog=_DEMO_EPILOG,
        add_help=False,
        description="Run workers.demo with the given arguments (see 'kvstore demo --help').",
    )
    demo.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the demo")
    demo.set_defaults(func=cmd_demo)
    return parser


def _version() -> str:
    import kvstore

    return kvstore.__version__


# ---------------------------------------------------------------- serve


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags as dotted config overrides; unset flags (None) leave file/env values alone."""
    overrides: dict[str, Any] = {
        "server.host": args.host,
        "server.port": args.port,
        "server.workers": args.workers,
        "server.max_blob_bytes": args.max_blob_bytes,
        "server.max_message_bytes": args.max_message_bytes,
        "memory.max_bytes": args.memory_bytes,
        "disk.path": args.disk_path,
        "disk.max_bytes": args.disk_bytes,
        "disk.fsync": args.fsync,
        "metrics.port": args.metrics_port,
    }
    if args.memory_prefault:
        overrides["memory.prefault"] = True
    if args.no_disk:
        overrides["disk.enabled"] = False
    if args.redis_url:
        overrides.update({"redis.enabled": True, "redis.url": args.redis_url})
    if args.s3_endpoint:
        overrides.update({"s3.enabled": True, "s3.endpoint_url": args.s3_endpoint})
    if args.s3_bucket:
        overrides["s3.bucket"] = args.s3_bucket
    return overrides


def cmd_serve(args: argparse.Namespace) -> int:
    from kvstore.config import config_as_dict, env_warnings, load_config

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, os.environ, serve_overrides(args))
    except ValueError as exc:
        print(f"kvstore serve: invalid configuration: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for warning in env_warnings(os.environ):
        logging.getLogger("kvstore.config").warning("%s", warning)
    if args.print_config:
        print(json.dumps(config_as_dict(config), indent=2))
        return 0

    from kvstore.server import run

    def on_ready(handle: Any) -> None:
        if args.ready_file:
            tmp = Path(args.ready_file + ".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "port": handle.port,
                        "pid": os.getpid(),
                        "target": handle.target,
                        "metrics_port": handle.metrics.port,
                    }
                )
            )
            tmp.replace(args.ready_file)  # atomic: a poller never reads half a file

    try:
        run(config, grace=args.grace, on_ready=on_ready)
    except OSError as exc:
        print(f"kvstore serve: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a start-up check past config.validate(): still one line, exit 2
        print(f"kvstore serve: invalid configuration: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------- bench, stats, demo


def bench_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "bench"


def cmd_bench(args: argparse.Namespace) -> int:
    directory = bench_dir()
    available = sorted(p.stem for p in directory.glob("*.py") if not p.stem.startswith("_"))
    if not args.name:
        print("available benchmarks: " + (", ".join(available) or f"none (no {directory})"))
        return 0
    script = directory / f"{args.name.removesuffix('.py')}.py"
    if not script.is_file():
        print(
            f"kvstore bench: no benchmark {args.name!r} in {directory}; available: {', '.join(available)}",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    root = str(directory.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call([sys.executable, str(script), *args.args], env=env)


@dataclass(frozen=True)
class ExternalCommand:
    """A subcommand whose code lives outside kvstore/: ``module:function(argv) -> exit code``."""

    module: str
    function: str
    #: What the import needs, said when it fails.
    needs: str


#: Subcommands implemented outside the kvstore package, imported only when run.
EXTERNAL_COMMANDS: dict[str, ExternalCommand] = {
    "stats": ExternalCommand(
        "transfer.cli", "stats_main", "the client package transfer/ (part of kvstore-llm)"
    ),
    "demo": ExternalCommand(
        "workers.demo",
        "main",
        "the kvstore repository checkout and the ML extras (pip install 'kvstore-llm[ml]')",
    ),
}


def run_external(name: str, argv: Sequence[str]) -> int:
    """Import the module of an :data:`EXTERNAL_COMMANDS` entry and run it with ``argv``."""
    command = EXTERNAL_COMMANDS[name]
    try:
        module = importlib.import_module(command.module)
    except ImportError as exc:
        print(
            f"kvstore {name}: cannot import {command.module} ({exc}); the {name} needs {command.needs}",
            file=sys.stderr,
        )
        return 2
    result = getattr(module, command.function)(list(argv))
    return int(result or 0)


def cmd_stats(args: argparse.Namespace) -> int:
    return run_external("stats", args.args)


def cmd_demo(args: argparse.Namespace) -> int:
    return run_external("demo", args.args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in EXTERNAL_COMMANDS:
        # Everything after the name belongs to the command, including --help (argparse's
        # REMAINDER would not take a leading option).
        return run_external(argv[0], argv[1:])
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
