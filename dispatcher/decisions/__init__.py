"""What the dispatcher decides, with no I/O: tables and state machines a test can drive by hand.

events (parsing and validating a published event), records (the headers a retried, parked or
dead-lettered delivery carries, and reading them back), routing (which subscribers want an event),
retry_policy (an attempt's outcome and what follows from it), circuit_breaker and endpoint_limits
(when a subscriber may be sent to), batching (collecting events into one POST) and cluster_shares
(each instance's share of a subscriber's limits). Nothing here opens a socket or talks to the
broker; the waits it offers are in-process futures and timers.
"""
