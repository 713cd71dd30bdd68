"""The running dispatcher: daemon (one worker process wiring broker, decisions and HTTP together),
pipeline (one message from the work queue to its settled deliveries), supervisor (the worker
processes of `dispatcher run`), metrics (Prometheus series) and log (structured logging).
"""
