"""What the tests and the load tests share: the machinery around a real broker and real HTTP.

harness (unique broker names, receivers on loopback, configs, a dispatcher in this process),
ports (free loopback ports), toml_files (writing a config document as TOML for a subprocess),
receiver_helpers and receiver_recipes (crafting webhooks for receivers, running receiver
recipes), tcp_proxy (a link that can be cut) and timed_receiver (receivers in a process of their
own). Nothing here mocks the broker or the HTTP client.
"""
