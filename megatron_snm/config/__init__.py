"""The run's configuration: the flag schema (flags.py) and the rules that resolve it (resolve.py).

    run = resolve(parse_args(argv), world_size)
"""
from megatron_snm.config.errors import ConfigError
from megatron_snm.config.flags import Flags, build_parser, flags_from_dict, parse_args
from megatron_snm.config.resolve import RunConfig, gpt_config_of, resolve

__all__ = ["ConfigError", "Flags", "RunConfig", "build_parser", "flags_from_dict", "gpt_config_of", "parse_args",
           "resolve"]
