"""svam: distil one-step shortcut video-action models (S-VAM) for robot policies."""

__version__ = "0.1.0"
