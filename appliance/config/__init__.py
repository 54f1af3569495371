"""Configuration: the schema (every setting declared once), the TOML layers, problems, secrets.

    schema.py  the settings, their defaults and help; Config; what a layer may hold
    text.py    decoding an operator's TOML file (BOM, curly quotes, non-UTF-8)
    watch.py   reload on file change (debounced directory watch), and what changed
    boot.py    importing /boot/firmware/appliance.toml at boot
"""

from appliance.config.schema import (
    BOOT_IMPORTED,
    ETC_CONFIG,
    ETC_DROPINS,
    SECTIONS,
    AudioSection,
    Config,
    ConfigError,
    GpioSection,
    Problem,
    Secret,
    config_paths,
    decode_toml,
    describe,
    effective_values,
    load_config,
    load_last_good,
    notes,
    parse_layers,
    render_default_toml,
    restart_only_keys,
    save_last_good,
)

__all__ = [
    "BOOT_IMPORTED", "ETC_CONFIG", "ETC_DROPINS", "SECTIONS", "AudioSection", "Config", "ConfigError",
    "GpioSection", "Problem", "Secret", "config_paths", "decode_toml", "describe", "effective_values",
    "load_config", "load_last_good", "notes", "parse_layers", "render_default_toml", "restart_only_keys", "save_last_good",
]
