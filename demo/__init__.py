"""`dispatcher demo`: the whole local loop once (see demo.loop).

It lives beside the dispatcher package, not inside it, because it starts the example receiver and
reads its SQLite store; it ships with the source checkout, not with the dispatcher's wheel.
"""
