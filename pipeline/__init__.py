"""The engine: config, ledger, runner, sharding, errors and CLI. It knows no model or website."""

__version__ = "0.1.0"
