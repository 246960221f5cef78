"""Command line: `egress serve`, `egress config check`."""

from __future__ import annotations

import argparse
import os
import sys

from egress import doctor, keys_cli, report
from egress.config import MAX_WORKERS, ConfigError, load_config, parse_listen, render_config, with_overrides
from egress.errors import StartupError
from egress.secrets import SecretSourceError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="egress", description="LLM egress gateway")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", metavar="FILE", help="TOML config (default: built-in config)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="override [server] listen")
    serve.add_argument("--admin-listen", metavar="HOST:PORT", help='override [server] admin_listen ("off" disables)')
    serve.add_argument(
        "--workers", type=int, metavar="N", help="worker processes (default: [server] workers, else CPUs)"
    )

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config file and print the effective config")
    check.add_argument("file")

    keys_cli.add_parsers(commands)
    report.add_parsers(commands)
    doctor.add_parsers(commands)

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args.config, args.listen, args.admin_listen, args.workers)
        if args.command == "keys":
            return keys_cli.run(args)
        if args.command == "usage":
            return report.run(args)
        if args.command == "doctor":
            return doctor.run(args)
        return _check(args.file)
    except (ConfigError, SecretSourceError) as exc:
        print(f"egress: config error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"egress: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"egress: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


def _serve(path: str | None, listen: str | None, admin_listen: str | None, workers: int | None) -> int:
    if workers is not None and not 0 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers takes 0..{MAX_WORKERS} (0: [server] workers, else one per CPU), not {workers}")
    config = load_config(path)
    flags = {"listen": listen, "admin_listen": admin_listen}
    # Checked as the file's own addresses are: `--listen` on the file's admin port used to start,
    # and under workers the kernel shared each port's connections between the two listeners.
    config = with_overrides(config, **{name: value for name, value in flags.items() if value is not None})
    doctor.preflight(config)  # what config check refuses, serve refuses, in the same words
    _raise_open_file_limit()
    workers = workers or config.server.workers or os.cpu_count() or 1
    if workers == 1:
        from egress.serve import serve  # uvloop is imported only when serving
        from egress.workers import ensure_free

        # Both ports before either is bound, as the supervisor probes them: a taken main port used
        # to be said after an `admin_listening` line, of an admin listener about to close.
        for setting in ("listen", "admin_listen"):
            address = getattr(config.server, setting)
            if address != "off" and parse_listen(address)[1] != 0:
                ensure_free(setting, address)
        return serve(config, path)
    from egress.workers import supervise

    return supervise(config, path, workers)


def _raise_open_file_limit() -> None:
    """Each connection is a descriptor, two when proxied: take all the kernel allows, as nginx does."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _check(path: str) -> int:
    config = load_config(path)
    doctor.preflight(config)
    sys.stdout.write(render_config(config))
    print(f"# {path}: OK", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
