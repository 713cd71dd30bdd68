"""Everything that speaks HTTP: headers (an attempt's webhook id, timestamp, agent token and
HMAC signature), sender (the POST to a subscriber and what its answer means), ssrf (the guard
that keeps those POSTs off private networks) and ops (the /healthz, /readyz, /metrics and JWKS
server).
"""
