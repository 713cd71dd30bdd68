"""Webhook dispatcher for email delivery events: RabbitMQ in, signed POSTs out, nothing lost."""

__version__ = "0.1.0"
__all__ = ["__version__"]
