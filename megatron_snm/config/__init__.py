"""The run's configuration: the flag schema (flags.py) and the rules that resolve it (resolve.py).

    run = resolve(parse_args(argv), world_size)
"""
from megatron_snm.config.errors import ConfigError
from megatron_snm.config.flags import Flags, build_parser, parse_args
from megatron_snm.config.resolve import RunConfig, resolve

__all__ = ["ConfigError", "Flags", "RunConfig", "build_parser", "parse_args", "resolve"]
