"""Configuration.

    schema.py  every setting declared once (type, default, range, help, live or not); Config
    load.py    the TOML layers, validation (Problem, ConfigError), secrets, the last good copy
    text.py    decoding an operator's TOML file (BOM, curly quotes, non-UTF-8)
    watch.py   reload on file change (debounced directory watch), and what changed
    boot.py    importing /boot/firmware/appliance.toml at boot
"""

from appliance.config.load import (
    BOOT_IMPORTED,
    ETC_CONFIG,
    ETC_DROPINS,
    ConfigError,
    Problem,
    config_paths,
    decode_toml,
    load_config,
    load_last_good,
    parse_layers,
    save_last_good,
)
from appliance.config.schema import (
    SECTIONS,
    AudioSection,
    Config,
    DisplaySection,
    GpioSection,
    Secret,
    describe,
    effective_values,
    notes,
    render_default_toml,
    restart_only_keys,
)

__all__ = [
    "BOOT_IMPORTED", "ETC_CONFIG", "ETC_DROPINS", "SECTIONS", "AudioSection", "Config", "ConfigError",
    "DisplaySection", "GpioSection", "Problem", "Secret", "config_paths", "decode_toml", "describe", "effective_values",
    "load_config", "load_last_good", "notes", "parse_layers", "render_default_toml", "restart_only_keys",
    "save_last_good",
]
