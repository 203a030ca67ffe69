"""Named model presets (JSON data files), shipped inside the package as ``phi3embed.configs``."""
