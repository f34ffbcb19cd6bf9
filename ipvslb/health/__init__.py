"""Passive health: the engine and its types (see engine.py)."""
from ipvslb.health.engine import *  # noqa: F401,F403
from ipvslb.health.engine import IN_ROTATION, MAX_PEER_CHECKS, OUT_OF_ROTATION  # noqa: F401
