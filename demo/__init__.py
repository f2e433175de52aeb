"""The demo: a simulated plant and node, a verifier on SQLite, two agents, a verdict at the end.

It drives only the command-line tools, each in its own process, the way an operator and an official would.
"""
