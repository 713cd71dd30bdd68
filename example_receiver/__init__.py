"""An example subscriber: the seed's self-healing application.

It verifies each webhook (agent token and/or HMAC), applies the event to its database in one
transaction keyed by webhook-id, and answers 2xx only once that transaction has committed. A
batch (`webhook-batch-size`) is verified once over the whole array and applied in one
transaction, each member keyed by its event id.
Run it with `python -m example_receiver --help`.
"""

from .app import create_app
from .settings import DatabaseUrl, ReceiverSettings, SettingsError

__all__ = ["DatabaseUrl", "ReceiverSettings", "SettingsError", "create_app"]
