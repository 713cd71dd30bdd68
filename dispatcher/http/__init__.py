"""Everything that speaks HTTP: sender (the signed POST to a subscriber and what its answer
means), ssrf (the guard that keeps those POSTs off private networks) and ops (the /healthz,
/readyz, /metrics and JWKS server).
"""
