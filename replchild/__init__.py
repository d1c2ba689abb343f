"""The child side of replserver: what runs inside a session's process, next to runner_child.py.

Stdlib only and cheap to import: every session pays for it at start-up, and it must never
bring the server package (aiohttp and friends) into the user's process. runner_child.py
removes these modules from sys.modules once it has them, so user code sees none of ours.
"""
