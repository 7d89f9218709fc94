"""The album read API and the Attractions web page (`landmarks serve`)."""

from shared.api.app import create_app
from shared.api.auth import make_token, verify_token

__all__ = ["create_app", "make_token", "verify_token"]
